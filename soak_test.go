package main

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// TestSoak runs a thousand WebSocket clients against the bridge and an
// embedded broker of its own, with a steady flow from some of them, and
// checks that every message reached every client exactly once, in each
// sender's order; that the heap stayed bounded; and that shutting down
// leaves no goroutine behind. go test -short skips it.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test skipped in -short mode")
	}
	const (
		clients  = 1000
		senders  = 20              // the first clients also send
		perSec   = 5               // messages a second from each sender
		duration = 3 * time.Second // of steady publishing
		messages = int(perSec * duration / time.Second)
	)
	goroutinesBefore := runtime.NumGoroutine()

	broker := NewBroker(BrokerConfig{})
	amqpCfg := testAMQPConfig("amqp://guest:guest@embedded/", "soak")
	amqpCfg.Dial = broker.Dial
	wsCfg := testWSConfig()
	wsCfg.MaxConns = clients
	// Under the race detector the clients read several times slower than
	// the bridge writes; a longer queue lets them catch up instead of
	// being cut off as too slow, which is right for browsers but not what
	// this test is about.
	wsCfg.SendQueue = 1024
	b := NewBus(slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})))
	br := newBridge(b, amqpCfg, wsCfg)
	server := httptest.NewServer(br.handler)
	must(t, b.Start())
	url := "ws" + strings.TrimPrefix(server.URL, "http") + "/ws"

	// Watch the heap while the soak runs.
	var peakHeap atomic.Uint64
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			if m.HeapInuse > peakHeap.Load() {
				peakHeap.Store(m.HeapInuse)
			}
			select {
			case <-stopWatch:
				return
			case <-tick.C:
			}
		}
	}()

	conns := make([]*websocket.Conn, clients)
	for i := range conns {
		c, _, err := websocket.DefaultDialer.Dial(url, nil)
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		conns[i] = c
	}
	poll(t, "the hub has every client", func() bool { return br.hub.Clients() == clients })

	// Each client checks what it reads as it goes: exactly once and in
	// order from every sender.
	var readers sync.WaitGroup
	failures := make(chan string, clients)
	for i, c := range conns {
		readers.Go(func() {
			next := make([]int, senders)
			c.SetReadDeadline(time.Now().Add(duration + waitFor))
			for got := 0; got < senders*messages; got++ {
				_, msg, err := c.ReadMessage()
				if err != nil {
					failures <- fmt.Sprintf("client %d after %d messages: %v", i, got, err)
					return
				}
				var s, n int
				if _, err := fmt.Sscanf(string(msg), "%d:%d", &s, &n); err != nil || s >= senders || n != next[s] {
					failures <- fmt.Sprintf("client %d got %q, want %d:%d", i, msg, s, next[s])
					return
				}
				next[s]++
			}
		})
	}

	start := time.Now()
	var writers sync.WaitGroup
	for s := range senders {
		writers.Go(func() {
			tick := time.NewTicker(time.Second / perSec)
			defer tick.Stop()
			for n := range messages {
				<-tick.C
				if err := conns[s].WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "%d:%d", s, n)); err != nil {
					failures <- fmt.Sprintf("sender %d: %v", s, err)
					return
				}
			}
		})
	}
	writers.Wait()
	readers.Wait()
	elapsed := time.Since(start)
	close(failures)
	for f := range failures {
		t.Error(f)
	}
	close(stopWatch)
	<-watched

	deliveries := clients * senders * messages
	t.Logf("%d clients, %d senders: %d messages, %d deliveries in %s (%.0f deliveries/s); peak heap in use %.1f MiB",
		clients, senders, senders*messages, deliveries, elapsed.Round(time.Millisecond),
		float64(deliveries)/elapsed.Seconds(), float64(peakHeap.Load())/(1<<20))
	if peak := peakHeap.Load(); peak > 512<<20 {
		t.Errorf("peak heap %d MiB, want under 512 MiB", peak>>20)
	}

	// Shut down as main does, and count goroutines.
	for _, c := range conns {
		c.Close()
	}
	b.Exit()
	server.Close()
	broker.Close()
	deadline := time.Now().Add(waitFor)
	for runtime.NumGoroutine() > goroutinesBefore {
		if time.Now().After(deadline) {
			var stacks strings.Builder
			pprof.Lookup("goroutine").WriteTo(&stacks, 1)
			t.Fatalf("%d goroutines left after shutdown, %d before:\n%s", runtime.NumGoroutine(), goroutinesBefore, stacks.String())
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}
