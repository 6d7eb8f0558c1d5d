package main

// /metrics and /debug/state, scraped after real traffic.

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape reads the bridge's /metrics with Prometheus' own text parser and
// returns each sample as "name{label="value"}" → value.
func scrape(t *testing.T, base string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	must(t, err)
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	samples := map[string]float64{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			key := name
			if len(m.GetLabel()) > 0 {
				var labels []string
				for _, l := range m.GetLabel() {
					labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
				}
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				samples[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				samples[key] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				samples[key+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return samples
}

func TestMetricsCountWhatHappened(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.SendQueueBytes = 128 << 10 // two big lines: a browser that stops reading is soon cut
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	base := tb.server.URL
	const n, m = 10, 3
	browsers := make([]*websocket.Conn, m)
	for i := range browsers {
		browsers[i] = tb.dial(t)
	}
	for i := range n {
		send(t, browsers[0], fmt.Sprint("line ", i))
	}
	for _, b := range browsers {
		receive(t, b, n)
	}
	want := map[string]float64{
		"wsamqp_browser_messages_received_total": n,
		"wsamqp_messages_published_total":        n,
		"wsamqp_messages_confirmed_total":        n,
		"wsamqp_deliveries_total":                n,
		"wsamqp_lines_written_total":             n * m,
		"wsamqp_delivery_latency_seconds_count":  n * m,
		"wsamqp_browsers":                        m,
		"wsamqp_broker_connected":                1,
	}
	var got map[string]float64
	poll(t, "the counters show the traffic", func() bool {
		got = scrape(t, base)
		for k, v := range want {
			if got[k] != v {
				return false
			}
		}
		return true
	})
	// One publish on ws2amqp per browser message; on amqp2ws, one per batch
	// of deliveries.
	if ws2amqp, amqp2ws := got[`wsamqp_bus_publishes_total{channel="ws2amqp"}`], got[`wsamqp_bus_publishes_total{channel="amqp2ws"}`]; ws2amqp != n || amqp2ws < 1 || amqp2ws > n {
		t.Errorf("bus publishes: ws2amqp %v, want %d; amqp2ws %v, want 1 to %d", ws2amqp, n, amqp2ws, n)
	}
	if got[`wsamqp_bus_state{state="STARTED"}`] != 1 || got["go_goroutines"] == 0 || got["process_resident_memory_bytes"] == 0 {
		t.Errorf("bus state, Go and process metrics missing: %v %v %v", got[`wsamqp_bus_state{state="STARTED"}`], got["go_goroutines"], got["process_resident_memory_bytes"])
	}

	// An oversized message: refused for its size, and its sender cut.
	big := tb.dial(t)
	send(t, big, strings.Repeat("x", 64<<10+1))
	expectClose(t, big, websocket.CloseMessageTooBig, "message too big")
	poll(t, "the refusal is counted", func() bool {
		got = scrape(t, base)
		return got[`wsamqp_browser_messages_refused_total{reason="size"}`] == 1 && got[`wsamqp_browsers_cut_total{reason="size"}`] == 1
	})

	// A browser that stops reading is cut as too slow.
	tb.dial(t) // it never reads
	fast := tb.dial(t)
	line := strings.Repeat("y", 60<<10)
	for i := 0; scrape(t, base)[`wsamqp_browsers_cut_total{reason="slow"}`] == 0; i++ {
		if i == 2000 {
			t.Fatal("the slow browser was never cut")
		}
		send(t, fast, line)
		receive(t, fast, 1)
	}
}

// /debug/state draws the bus: every channel's listeners in the order they
// run, and the AMQP link.
func TestDebugState(t *testing.T) {
	broker := testBrokers(t)[0]
	exchange := testExchange(t, broker)
	tb := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
	send(t, tb.dial(t), "hello")
	resp, err := http.Get(tb.server.URL + "/debug/state")
	must(t, err)
	defer resp.Body.Close()
	var state debugState
	must(t, json.NewDecoder(resp.Body).Decode(&state))
	if state.Bus.State != "STARTED" || !state.AMQP.Connected || state.AMQP.Exchange != exchange || state.AMQP.Stream != exchange {
		t.Fatalf("state %+v", state)
	}
	if strings.Contains(state.AMQP.Node, ":guest@") {
		t.Errorf("/debug/state shows the password: %q", state.AMQP.Node)
	}
	listeners := map[string][]string{}
	for _, c := range state.Bus.Channels {
		for _, l := range c.Listeners {
			listeners[c.Name] = append(listeners[c.Name], fmt.Sprintf("%s/%d", l.Name, l.Priority))
		}
	}
	for channel, want := range map[string]string{
		ChannelStart:    "amqp/40 ws/60",
		ChannelStop:     "ws/40 amqp/60",
		ChannelWS2AMQP:  "amqp/50",
		ChannelAMQP2WS:  "ws/50",
		ChannelReplay:   "amqp/50",
		ChannelCaughtUp: "ws/50",
	} {
		if got := strings.Join(listeners[channel], " "); got != want {
			t.Errorf("channel %s: listeners %q, want %q", channel, got, want)
		}
	}
}

// -metrics-addr moves /metrics and /debug/ off the chat's address.
func TestMetricsAddrMovesThem(t *testing.T) {
	base, out, stop := startRun(t, "-metrics-addr", "127.0.0.1:0")
	defer stop()
	serving := regexp.MustCompile(`msg="serving metrics" url=(\S+)`)
	var metricsBase string
	poll(t, "the metrics server serves", func() bool {
		if m := serving.FindStringSubmatch(out.String()); m != nil {
			metricsBase = m[1]
		}
		return metricsBase != ""
	})
	for url, want := range map[string]int{
		metricsBase + "/metrics":     http.StatusOK,
		metricsBase + "/debug/":      http.StatusOK,
		metricsBase + "/debug/state": http.StatusOK,
		base + "/metrics":            http.StatusNotFound,
		base + "/debug/":             http.StatusNotFound,
		base + "/":                   http.StatusOK,
	} {
		resp, err := http.Get(url)
		must(t, err)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", url, resp.StatusCode, want)
		}
	}
}

// The latency histogram counts like Prometheus' own histogram with the
// same buckets, at the edges of every bucket and between them.
func TestLatencyHistogramMatchesPrometheus(t *testing.T) {
	ours := newLatencyHistogram()
	theirs := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "x", Buckets: prometheus.ExponentialBuckets(latencyFirst.Seconds(), 2, latencyBuckets),
	})
	var c latencyCounts
	for _, d := range []int64{-5, 0, 1, 499_999, 500_000, 500_001, 1_000_000, 1_000_001, 3_000_000, 4_096_000_000, 4_096_000_001, 9e9} {
		c.add(d)
		theirs.Observe(float64(d) / 1e9)
	}
	ours.add(&c)
	read := func(col prometheus.Collector) *dto.Histogram {
		ch := make(chan prometheus.Metric, 1)
		col.Collect(ch)
		var m dto.Metric
		must(t, (<-ch).Write(&m))
		return m.GetHistogram()
	}
	a, b := read(ours), read(theirs)
	if a.GetSampleCount() != b.GetSampleCount() || math.Abs(a.GetSampleSum()-b.GetSampleSum()) > 1e-9 {
		t.Errorf("count %d sum %g, want %d and %g", a.GetSampleCount(), a.GetSampleSum(), b.GetSampleCount(), b.GetSampleSum())
	}
	for i, bucket := range b.GetBucket() {
		got := a.GetBucket()[i]
		if got.GetUpperBound() != bucket.GetUpperBound() || got.GetCumulativeCount() != bucket.GetCumulativeCount() {
			t.Errorf("bucket le=%g: %d, want le=%g: %d", got.GetUpperBound(), got.GetCumulativeCount(), bucket.GetUpperBound(), bucket.GetCumulativeCount())
		}
	}
}
