package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	amqp "github.com/rabbitmq/amqp091-go"
)

// The fan-out benchmarks: one client publishes, every client (itself
// included) receives. Each reports deliveries a second and the 99th
// percentile of publish-to-deliver latency, for three servers in the same
// run: wsamqp through the embedded broker, wsamqp through RabbitMQ (when
// AMQP_URL is set), and a bare broadcast hub over the same WebSocket
// library with no bus and no AMQP, the physical limit of this design.
//
//	go test -run '^$' -bench Fanout -benchtime 2000x

// fanoutWindow bounds how many messages the publisher has in flight (sent
// but not yet back), and fanoutQueue is the per-client send queue of both
// servers: long enough that no client falls that far behind the
// publisher's window, so that the benchmark measures throughput, not
// the cutting off of slow clients.
const (
	fanoutWindow = 64
	fanoutQueue  = 1024
)

func BenchmarkFanout(b *testing.B) {
	for _, clients := range []int{10, 100, 1000} {
		for _, target := range fanoutTargets(b) {
			b.Run(fmt.Sprintf("clients=%d/%s", clients, target.name), func(b *testing.B) {
				url, stop := target.start(b, clients)
				defer stop()
				benchmarkFanout(b, url, clients)
			})
		}
	}
}

// fanoutTarget is a server the fan-out benchmark runs against.
type fanoutTarget struct {
	name  string
	start func(b *testing.B, clients int) (url string, stop func())
}

// fanoutTargets returns the bare hub, wsamqp through the embedded broker
// (with and without metrics, to show what counting costs), and wsamqp
// through RabbitMQ when AMQP_URL is set.
func fanoutTargets(b *testing.B) []fanoutTarget {
	targets := []fanoutTarget{{"hub", startBareHub}}
	for _, broker := range testBrokers(b) {
		targets = append(targets, fanoutTarget{"wsamqp-" + broker.name, func(b *testing.B, clients int) (string, func()) {
			if broker.why != "" {
				b.Fatal(broker.why)
			}
			return startBenchBridge(b, broker, clients, true)
		}})
		if broker.name == "embedded" {
			targets = append(targets, fanoutTarget{"wsamqp-embedded-nometrics", func(b *testing.B, clients int) (string, func()) {
				return startBenchBridge(b, broker, clients, false)
			}})
		}
	}
	return targets
}

// startBenchBridge serves a bridge with the flags' defaults, no rate limit
// and room for the clients; without metrics, it counts nothing.
func startBenchBridge(b *testing.B, broker testBroker, clients int, metrics bool) (string, func()) {
	bus := NewBus(slog.New(slog.NewTextHandler(b.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})))
	wsCfg := testWSConfig()
	wsCfg.MaxConns, wsCfg.Rate, wsCfg.SendQueue = clients, 0, fanoutQueue
	amqpCfg := testAMQPConfig(broker.url, testExchange(b, broker))
	if broker.name == "embedded" {
		// A broker of its own, in-process, as go run . has it.
		embedded := NewBroker(BrokerConfig{})
		amqpCfg.URL, amqpCfg.Dial = "amqp://guest:guest@embedded/", embedded.Dial
		b.Cleanup(func() { embedded.Close() })
	}
	br := newBridge(bus, amqpCfg, wsCfg)
	if !metrics {
		br.amqp.metrics, br.hub.metrics = nil, nil
	}
	server := httptest.NewServer(br.handler)
	must(b, bus.Start())
	return wsURL(server), func() { bus.Exit(); server.Close() }
}

// wsURL is the /ws URL of an httptest server.
func wsURL(s *httptest.Server) string { return "ws" + strings.TrimPrefix(s.URL, "http") + "/ws" }

// benchmarkFanout publishes b.N messages from the first of clients and
// waits until every client has them all.
func benchmarkFanout(b *testing.B, url string, clients int) {
	conns := make([]*websocket.Conn, clients)
	for i := range conns {
		c, _, err := websocket.DefaultDialer.Dial(url, nil)
		must(b, err)
		defer c.Close()
		conns[i] = c
	}
	// A warm-up message goes all the way round before the clock starts,
	// so that every link on the path is up.
	warm := fmt.Appendf(nil, "warm-up %d", time.Now().UnixNano())
	must(b, conns[0].WriteMessage(websocket.TextMessage, warm))
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(waitFor))
		for {
			_, msg, err := c.ReadMessage()
			if err != nil {
				b.Fatalf("client %d waiting for the warm-up: %v", i, err)
			}
			if string(msg) == string(warm) {
				break
			}
		}
	}

	latencies := make([][]time.Duration, clients)
	back := make(chan struct{}, fanoutWindow) // the publisher's own messages, as they return
	var readers sync.WaitGroup
	for i, c := range conns {
		latencies[i] = make([]time.Duration, 0, b.N)
		readers.Go(func() {
			c.SetReadDeadline(time.Now().Add(waitFor + time.Duration(b.N)*time.Millisecond))
			for range b.N {
				_, msg, err := c.ReadMessage()
				if err != nil {
					b.Errorf("client %d: %v", i, err)
					return
				}
				sent, _ := strconv.ParseInt(string(msg[:19]), 10, 64)
				latencies[i] = append(latencies[i], time.Since(time.Unix(0, sent)))
				if i == 0 {
					back <- struct{}{}
				}
			}
		})
	}

	b.ResetTimer()
	body := []byte(strings.Repeat(" ", 64)) // a 19-digit send time in nanoseconds, then padding
	for n := range b.N {
		if n >= fanoutWindow {
			<-back
		}
		strconv.AppendInt(body[:0], time.Now().UnixNano(), 10)
		if err := conns[0].WriteMessage(websocket.TextMessage, body); err != nil {
			b.Fatal(err)
		}
	}
	readers.Wait()
	b.StopTimer()

	all := slices.Concat(latencies...)
	slices.Sort(all)
	if len(all) == 0 {
		return
	}
	b.ReportMetric(float64(len(all))/b.Elapsed().Seconds(), "deliveries/s")
	b.ReportMetric(float64(all[len(all)*99/100])/float64(time.Millisecond), "p99-ms")
	b.ReportMetric(0, "ns/op") // deliveries/s says it better
}

// bareHub is the baseline: the gorilla chat example's hub, with a
// prepared message per broadcast and a bounded send queue per client
// (a client that lets it fill is disconnected, as in the example), and
// nothing else.
type bareHub struct {
	upgrader websocket.Upgrader

	mu      sync.Mutex // guards clients
	clients map[chan *websocket.PreparedMessage]*websocket.Conn
}

// startBareHub serves a bare hub.
func startBareHub(b *testing.B, clients int) (string, func()) {
	h := &bareHub{clients: map[chan *websocket.PreparedMessage]*websocket.Conn{}}
	server := httptest.NewServer(h)
	return wsURL(server), server.Close
}

// ServeHTTP runs one client: a writer goroutine, and the reader here. The
// client joins the hub before the handshake is answered, as in wsamqp, so
// that it misses nothing broadcast after its Dial returns.
func (h *bareHub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	send := make(chan *websocket.PreparedMessage, fanoutQueue)
	h.mu.Lock()
	h.clients[send] = nil
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.clients, send)
		h.mu.Unlock()
	}()
	conn, err := h.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer conn.Close()
	h.mu.Lock()
	h.clients[send] = conn
	h.mu.Unlock()
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case pm := <-send:
				if conn.WritePreparedMessage(pm) != nil {
					return
				}
			case <-done:
				return
			}
		}
	}()
	for {
		_, msg, err := conn.ReadMessage()
		if err != nil {
			return
		}
		pm, _ := websocket.NewPreparedMessage(websocket.TextMessage, msg)
		h.mu.Lock()
		for c, conn := range h.clients {
			select {
			case c <- pm:
			default:
				if conn != nil {
					conn.Close() // too slow
				}
			}
		}
		h.mu.Unlock()
	}
}

// BenchmarkIdleConnMemory reports the heap that one idle browser costs
// the bridge, over a thousand idle connections. The clients are bare TCP
// connections that did the WebSocket handshake by hand, so that they cost
// the shared heap next to nothing; what they do cost is counted against
// the bridge, which makes the figure an upper bound.
func BenchmarkIdleConnMemory(b *testing.B) {
	const idle = 1000
	broker := NewBroker(BrokerConfig{})
	defer broker.Close()
	amqpCfg := testAMQPConfig("amqp://guest:guest@embedded/", "idle")
	amqpCfg.Dial = broker.Dial
	wsCfg := testWSConfig()
	wsCfg.MaxConns = idle
	bus := NewBus(nil)
	br := newBridge(bus, amqpCfg, wsCfg)
	server := httptest.NewServer(br.handler)
	defer server.Close()
	must(b, bus.Start())
	defer bus.Exit()

	for range b.N {
		before := heapInUse()
		conns := make([]net.Conn, idle)
		for i := range conns {
			conns[i] = rawWebSocket(b, server.Listener.Addr().String())
		}
		poll(b, "the hub has every client", func() bool { return br.hub.Clients() == idle })
		perConn := (float64(heapInUse()) - float64(before)) / idle
		b.ReportMetric(perConn/1024, "KiB/conn")
		for _, c := range conns {
			c.Close()
		}
		poll(b, "the hub is empty", func() bool { return br.hub.Clients() == 0 })
	}
}

// samplePeakHeap samples the heap every 5 ms until the returned func is
// called, which returns the highest it saw.
func samplePeakHeap() (stop func() uint64) {
	var peak uint64
	done, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapAlloc)
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	return func() uint64 {
		close(done)
		<-sampled
		return peak
	}
}

// heapInUse returns the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// rawWebSocket opens a WebSocket to /ws at addr with nothing but a TCP
// connection: it writes the handshake and reads the answer byte by byte.
func rawWebSocket(b *testing.B, addr string) net.Conn {
	c, err := net.Dial("tcp", addr)
	must(b, err)
	_, err = io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: "+addr+"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	must(b, err)
	var head []byte
	one := make([]byte, 1)
	for !strings.HasSuffix(string(head), "\r\n\r\n") {
		if _, err := c.Read(one); err != nil {
			b.Fatalf("handshake: %v after %q", err, head)
		}
		head = append(head, one[0])
	}
	if !strings.HasPrefix(string(head), "HTTP/1.1 101") {
		b.Fatalf("handshake refused: %q", head)
	}
	return c
}

// BenchmarkMemoryUnderLoad prints the peak heap of a bridge in two cases
// that used to cost a copy of the queued frames per browser: 400 browsers
// that stop reading while one sender sends 64 KiB lines within the rate
// limit (2.3 GB before frames were shared), and 100 browsers that each
// send one 64 KiB line (908 MB before).
func BenchmarkMemoryUnderLoad(b *testing.B) {
	run := func(b *testing.B, browsers int, load func(conns []*websocket.Conn)) {
		broker := NewBroker(BrokerConfig{})
		defer broker.Close()
		amqpCfg := testAMQPConfig("amqp://guest:guest@embedded/", "memory")
		amqpCfg.Dial = broker.Dial
		wsCfg := testWSConfig()
		wsCfg.MaxConns, wsCfg.MaxConnsPerIP = browsers+1, browsers+1
		bus := NewBus(nil)
		br := newBridge(bus, amqpCfg, wsCfg)
		server := httptest.NewServer(br.handler)
		defer server.Close()
		must(b, bus.Start())
		defer bus.Exit()
		for range b.N {
			conns := make([]*websocket.Conn, browsers)
			for i := range conns {
				c, _, err := websocket.DefaultDialer.Dial(wsURL(server), nil)
				must(b, err)
				conns[i] = c
			}
			base := heapInUse()
			stopSampling := samplePeakHeap()
			load(conns)
			peak := stopSampling()
			b.ReportMetric(float64(peak)/(1<<20), "MiB-peak-heap")
			b.ReportMetric(float64(peak-min(peak, base))/(1<<20), "MiB-above-idle")
			for _, c := range conns {
				c.Close()
			}
			poll(b, "the hub is empty", func() bool { return br.hub.Clients() == 0 })
		}
	}
	line := strings.Repeat("x", 64<<10-16)
	b.Run("400-stuck-readers", func(b *testing.B) {
		run(b, 401, func(conns []*websocket.Conn) {
			sender := conns[0] // the others never read
			const lines = 500  // the whole burst the rate limit allows
			got := make(chan struct{})
			go func() {
				defer close(got)
				sender.SetReadDeadline(time.Now().Add(waitFor))
				for range lines {
					if _, _, err := sender.ReadMessage(); err != nil {
						return
					}
				}
			}()
			for i := range lines {
				if sender.WriteMessage(websocket.TextMessage, []byte(fmt.Sprint(i, line))) != nil {
					break
				}
			}
			<-got
		})
	})
	b.Run("100-senders-one-line", func(b *testing.B) {
		run(b, 100, func(conns []*websocket.Conn) {
			var wg sync.WaitGroup
			for i, c := range conns {
				wg.Go(func() {
					c.WriteMessage(websocket.TextMessage, []byte(fmt.Sprint(i, line)))
					c.SetReadDeadline(time.Now().Add(waitFor))
					for range conns {
						if _, _, err := c.ReadMessage(); err != nil {
							return
						}
					}
				})
			}
			wg.Wait()
		})
	})
}

// BenchmarkResumeStorm: 1,000 wsamqp.v1 browsers in 10 rooms, each having
// seen its room up to a different offset, reconnect at once to a bridge
// that was just restarted, with their own since, while 10 more lines a
// room were sent during the restart. Every one must get exactly the lines
// after its since, then ready. "cache" serves them from the restarted
// bridge's memory (it read the stream on start); "stream" keeps 5 lines a
// room in memory, so that every resume reads the stream (at most 8 at
// once). It prints the time until all are ready and the peak heap.
func BenchmarkResumeStorm(b *testing.B) {
	for _, tc := range []struct {
		name       string
		historyMax int
	}{{"cache", 1000}, {"stream", 5}} {
		b.Run(tc.name, func(b *testing.B) {
			for range b.N {
				resumeStorm(b, tc.historyMax)
			}
		})
	}
}

func resumeStorm(b *testing.B, historyMax int) {
	const browsers, rooms, before, during = 1000, 10, 20, 10
	broker := NewBroker(BrokerConfig{MaxConns: 100})
	defer broker.Close()
	amqpCfg := testAMQPConfig("amqp://guest:guest@embedded/", "storm")
	amqpCfg.Dial = broker.Dial
	wsCfg := testWSConfig()
	wsCfg.MaxConns, wsCfg.MaxConnsPerIP, wsCfg.HistoryMax, wsCfg.History = browsers, browsers, historyMax, 0
	serve := func() (*Bus, string) {
		bus := NewBus(nil)
		br := newBridge(bus, amqpCfg, wsCfg)
		server := httptest.NewServer(br.handler)
		b.Cleanup(server.Close)
		must(b, bus.Start())
		return bus, wsURL(server)
	}
	publish := func(n int, tag string) {
		conn, err := amqp.DialConfig(amqpCfg.URL, amqp.Config{Dial: broker.Dial})
		must(b, err)
		defer conn.Close()
		ch, err := conn.Channel()
		must(b, err)
		must(b, ch.Confirm(false))
		for i := range n {
			for r := range rooms {
				dc, err := ch.PublishWithDeferredConfirm("storm", fmt.Sprint("room", r), false, false, amqp.Publishing{Body: fmt.Appendf(nil, "%s:%d", tag, i)})
				must(b, err)
				dc.Wait()
			}
		}
	}

	bus, url := serve()
	conns := make([]*websocket.Conn, browsers)
	dialer := websocket.Dialer{Subprotocols: []string{ProtocolV1}}
	for i := range conns {
		c, _, err := dialer.Dial(fmt.Sprintf("%s?room=room%d&history=0", url, i%rooms), nil)
		must(b, err)
		conns[i] = c
	}
	publish(before, "before")
	// Each browser reads its room's lines and keeps the offset of the one
	// it pretends to have seen last: a different one for each.
	since := make([]int64, browsers)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			defer c.Close()
			v := &v1Conn{Conn: c}
			v.untilReady(b)
			for n := range before {
				_, offset := v.message(b)
				if n == i%before {
					since[i] = offset
				}
			}
		})
	}
	wg.Wait()
	bus.Exit()
	publish(during, "during")

	base := heapInUse()
	stopSampling := samplePeakHeap()
	start := time.Now()
	_, url = serve()
	var wrong atomic.Int64
	for i := range browsers {
		wg.Go(func() {
			c, _, err := dialer.Dial(fmt.Sprintf("%s?room=room%d&since=%d", url, i%rooms, since[i]), nil)
			if err != nil {
				wrong.Add(1)
				return
			}
			defer c.Close()
			got, _, gap, _ := (&v1Conn{Conn: c}).untilReady(b)
			var want []string
			for n := i%before + 1; n < before; n++ {
				want = append(want, fmt.Sprint("before:", n))
			}
			for n := range during {
				want = append(want, fmt.Sprint("during:", n))
			}
			if gap || !slices.Equal(got, want) {
				wrong.Add(1)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	peak := stopSampling()
	if n := wrong.Load(); n > 0 {
		b.Fatalf("%d of %d browsers did not get exactly what they missed", n, browsers)
	}
	b.ReportMetric(float64(elapsed.Milliseconds()), "ms-until-all-ready")
	b.ReportMetric(float64(peak-min(peak, base))/(1<<20), "MiB-peak-above-idle")
}
