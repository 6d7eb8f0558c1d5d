package main

// Metrics and a live view of the bus. The posts' process had a bus and a
// log; an operator of a chat gateway wants numbers to alert on, and a
// learner would rather watch the bus than read about it. /metrics speaks
// Prometheus' text format, through Prometheus' own client library; /debug
// is a page that draws the bus of bus.go as it runs: its state, every bus
// channel with its listeners in the order they run, how often each is
// published on, the AMQP link, and the browsers in each room.
//
// The invariant to alert on: every message the stream delivers is either
// written to the browsers of its room or counted in
// wsamqp_broker_messages_dropped_total, by reason.

import (
	"encoding/json"
	"math/bits"
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds the bridge's Prometheus collectors, in a registry of its
// own. A nil *Metrics counts nothing, so that a benchmark can measure what
// counting costs.
type Metrics struct {
	registry *prometheus.Registry

	received   prometheus.Counter
	refused    *prometheus.CounterVec
	published  prometheus.Counter
	confirmed  prometheus.Counter
	delivered  prometheus.Counter
	dropped    *prometheus.CounterVec
	written    prometheus.Counter
	cut        *prometheus.CounterVec
	replays    *prometheus.CounterVec
	gaps       prometheus.Counter
	reconnects prometheus.Counter
	node       *prometheus.GaugeVec
	batch      prometheus.Histogram
	latency    *latencyHistogram
}

// NewMetrics returns the bridge's metrics, with Go's runtime and process
// metrics registered beside them.
func NewMetrics() *Metrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "wsamqp_" + name, Help: help})
	}
	byReason := func(name, help, label string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "wsamqp_" + name, Help: help}, []string{label})
	}
	m := &Metrics{
		registry:   prometheus.NewRegistry(),
		received:   counter("browser_messages_received_total", "Messages read from browsers."),
		refused:    byReason("browser_messages_refused_total", "Browser messages refused, by reason.", "reason"),
		published:  counter("messages_published_total", "Browser messages published to the exchange (a republish counts again)."),
		confirmed:  counter("messages_confirmed_total", "Browser messages the broker confirmed."),
		delivered:  counter("deliveries_total", "Messages from the stream handed to the browsers of their room."),
		dropped:    byReason("broker_messages_dropped_total", "Messages from the stream not handed to browsers, by reason.", "reason"),
		written:    counter("lines_written_total", "Messages written to browsers, one per browser."),
		cut:        byReason("browsers_cut_total", "Browsers the bridge disconnected, by reason.", "reason"),
		replays:    byReason("replays_total", "History and resumes served, by where from: cache or stream.", "source"),
		gaps:       counter("gaps_total", "Resumes told of a gap: the stream no longer held what the browser had last."),
		reconnects: counter("broker_reconnects_total", "Reconnections to the broker."),
		node:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "wsamqp_broker_node", Help: "1 for the broker node the bridge is connected to."}, []string{"node"}),
		batch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "wsamqp_browser_queue_depth", Help: "Messages waiting for a browser, taken by one write.",
			Buckets: []float64{1, 2, 4, 8, 16, 64, 256, 1024, 4096},
		}),
		latency: newLatencyHistogram(),
	}
	m.registry.MustRegister(m.received, m.refused, m.published, m.confirmed, m.delivered, m.dropped, m.written,
		m.cut, m.replays, m.gaps, m.reconnects, m.node, m.batch, m.latency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// register adds collectors that read the bridge's state when scraped.
func (m *Metrics) register(br *bridge) {
	if m == nil {
		return
	}
	m.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "wsamqp_browsers", Help: "Browsers connected."},
			func() float64 { return float64(br.hub.Clients()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "wsamqp_broker_connected", Help: "1 while the link to the broker is up."},
			func() float64 { return boolFloat(br.amqp.Connected()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "wsamqp_outbox_messages", Help: "Browser messages waiting for the broker."},
			func() float64 { return float64(len(br.amqp.outbox)) }),
		busCollector{br.bus},
	)
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// busCollector turns the bus's snapshot into metrics: publishes per bus
// channel, and the state.
type busCollector struct{ bus *Bus }

var (
	busPublishes = prometheus.NewDesc("wsamqp_bus_publishes_total", "Publishes on each bus channel.", []string{"channel"}, nil)
	busState     = prometheus.NewDesc("wsamqp_bus_state", "1 for the bus's current state.", []string{"state"}, nil)
)

func (c busCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- busPublishes
	ch <- busState
}

func (c busCollector) Collect(ch chan<- prometheus.Metric) {
	snap := c.bus.Snapshot()
	for _, bc := range snap.Channels {
		ch <- prometheus.MustNewConstMetric(busPublishes, prometheus.CounterValue, float64(bc.Published), bc.Name)
	}
	for _, s := range []State{StateStopped, StateStarting, StateStarted, StateStopping, StateExiting} {
		ch <- prometheus.MustNewConstMetric(busState, prometheus.GaugeValue, boolFloat(s.String() == snap.State), s.String())
	}
}

// The counting methods; each does nothing on a nil *Metrics.

func (m *Metrics) browserMessage() {
	if m != nil {
		m.received.Inc()
	}
}

func (m *Metrics) refusedMessage(reason string) {
	if m != nil {
		m.refused.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) publishedMessages(n int) {
	if m != nil {
		m.published.Add(float64(n))
	}
}

func (m *Metrics) confirmedMessages(n int) {
	if m != nil {
		m.confirmed.Add(float64(n))
	}
}

func (m *Metrics) deliveries(n int) {
	if m != nil {
		m.delivered.Add(float64(n))
	}
}

func (m *Metrics) droppedMessage(reason string) {
	if m != nil {
		m.dropped.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) browserCut(reason string) {
	if m != nil {
		m.cut.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) replay(source string, gap bool) {
	if m != nil {
		m.replays.WithLabelValues(source).Inc()
		if gap {
			m.gaps.Inc()
		}
	}
}

func (m *Metrics) reconnected() {
	if m != nil {
		m.reconnects.Inc()
	}
}

// connectedTo records the broker node the bridge is on.
func (m *Metrics) connectedTo(node string) {
	if m != nil {
		m.node.Reset()
		m.node.WithLabelValues(node).Set(1)
	}
}

// wrote records one write to a browser: how many messages it took, and
// each message's time from reaching a bridge (sent, Unix nanoseconds; 0
// for the bridge's own events) to now.
func (m *Metrics) wrote(items []queued, now time.Time) {
	if m == nil || len(items) == 0 {
		return
	}
	var obs latencyCounts
	lines, live := 0, 0
	for _, it := range items {
		lines += it.n
		if it.sent == nil {
			continue // the bridge's own lines: history, events
		}
		live += it.n
		for _, sent := range it.sent {
			if sent > 0 {
				obs.add(now.UnixNano() - sent)
			}
		}
	}
	m.latency.add(&obs)
	m.batch.Observe(float64(lines))
	m.written.Add(float64(live))
}

// handler serves /metrics.
func (m *Metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{Registry: m.registry})
}

// debugState is what /debug/state answers: the bus drawn, the AMQP link,
// the rooms.
type debugState struct {
	Bus   BusSnapshot    `json:"bus"`
	AMQP  amqpSnapshot   `json:"amqp"`
	Rooms map[string]int `json:"rooms"` // browsers in each room
}

// amqpSnapshot is the AMQP link in /debug/state.
type amqpSnapshot struct {
	Connected bool   `json:"connected"`
	Node      string `json:"node"`
	Exchange  string `json:"exchange"`
	Stream    string `json:"stream"`
	Offset    int64  `json:"offset"` // the last offset broadcast; -1 before any
}

// debugStateHandler serves /debug/state.
func (br *bridge) debugStateHandler(w http.ResponseWriter, r *http.Request) {
	state := debugState{
		Bus: br.bus.Snapshot(),
		AMQP: amqpSnapshot{
			Connected: br.amqp.Connected(),
			Node:      br.amqp.Node(),
			Exchange:  br.amqp.cfg.Exchange,
			Stream:    br.amqp.cfg.Stream,
		},
	}
	state.AMQP.Offset, state.Rooms = br.hub.roomCounts()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(state)
}

// profile serves Go's profiler at /debug/pprof/ beside /metrics: where the
// README's performance chapter takes its profiles from. It is off unless
// -pprof asks for it, since a profile shows the program's insides.
func (br *bridge) profile() {
	br.debug.HandleFunc("GET /debug/pprof/", pprof.Index)
	br.debug.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	br.debug.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	br.debug.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	br.debug.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}

// latencyHistogram is wsamqp_delivery_latency_seconds: from a browser's
// message reaching a bridge to its write to each browser, one observation
// a browser. At full load that is over a million observations a second,
// so a write counts its lines locally (latencyCounts) and adds them here
// once, bucket by bucket, rather than observing them one at a time; a
// scrape reads it as a Prometheus histogram like any other. Its buckets
// are 0.5 ms × 2^i, i = 0..13, whose index a latency gives in constant
// time.
type latencyHistogram struct {
	desc    *prometheus.Desc
	buckets [latencyBuckets + 1]atomic.Uint64 // per bucket, not cumulative; the last is +Inf
	nanos   atomic.Int64                      // the sum
}

const (
	latencyBuckets = 14
	latencyFirst   = 500 * time.Microsecond // the first bucket's upper bound
)

// latencyCounts is one write's observations.
type latencyCounts struct {
	buckets [latencyBuckets + 1]uint64
	nanos   int64
}

// add counts a latency of d nanoseconds: in bucket i when d is at most
// latencyFirst × 2^i, and at or below zero (clocks of two bridges apart)
// in the first.
func (c *latencyCounts) add(d int64) {
	i := 0
	if d > 0 {
		i = min(bits.Len64(uint64((d-1)/int64(latencyFirst))), latencyBuckets)
	}
	c.buckets[i]++
	c.nanos += d
}

func newLatencyHistogram() *latencyHistogram {
	return &latencyHistogram{desc: prometheus.NewDesc("wsamqp_delivery_latency_seconds",
		"From a browser's message reaching a bridge to its write to each browser.", nil, nil)}
}

func (h *latencyHistogram) add(c *latencyCounts) {
	for i, n := range c.buckets {
		if n > 0 {
			h.buckets[i].Add(n)
		}
	}
	h.nanos.Add(c.nanos)
}

func (h *latencyHistogram) Describe(ch chan<- *prometheus.Desc) { ch <- h.desc }

func (h *latencyHistogram) Collect(ch chan<- prometheus.Metric) {
	cumulative := make(map[float64]uint64, latencyBuckets)
	var count uint64
	for i := range latencyBuckets {
		count += h.buckets[i].Load()
		cumulative[(latencyFirst << i).Seconds()] = count
	}
	count += h.buckets[latencyBuckets].Load()
	ch <- prometheus.MustNewConstHistogram(h.desc, count, float64(h.nanos.Load())/1e9, cumulative)
}
