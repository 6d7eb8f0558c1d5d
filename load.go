package main

// The load tool: not in the posts, which stopped at two windows. It is a
// mode of the same binary, so that the package stays flat:
//
//	go run . load -clients 100 -rate 2000 -duration 10s -size 64 ws://127.0.0.1:8888/ws
//
// It opens real WebSocket clients against the URL it is given and nothing
// else, has them publish at a steady total rate, and reports what came back.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// loadConfig is what the load tool's flags say.
type loadConfig struct {
	url      string
	clients  int
	senders  int
	rate     float64
	duration time.Duration
	size     int
	drain    time.Duration
	json     bool
}

// loadResult is what one load run measured.
type loadResult struct {
	Clients       int     `json:"clients"`
	Sent          int     `json:"sent"`
	Expected      int     `json:"expected"`
	Delivered     int     `json:"delivered"`
	Lost          int     `json:"lost"`
	Duplicated    int     `json:"duplicated"`
	Reordered     int     `json:"reordered"`
	DeliveriesSec float64 `json:"deliveries_per_sec"`
	P50           float64 `json:"p50_ms"`
	P90           float64 `json:"p90_ms"`
	P99           float64 `json:"p99_ms"`
	Max           float64 `json:"max_ms"`
}

func (r loadResult) String() string {
	return fmt.Sprintf("clients=%d sent=%d expected=%d delivered=%d lost=%d duplicated=%d reordered=%d deliveries/s=%.0f latency p50=%.2fms p90=%.2fms p99=%.2fms max=%.2fms",
		r.Clients, r.Sent, r.Expected, r.Delivered, r.Lost, r.Duplicated, r.Reordered, r.DeliveriesSec, r.P50, r.P90, r.P99, r.Max)
}

// runLoad is the load tool's main.
func runLoad(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg loadConfig
	fs := flag.NewFlagSet("wsamqp load", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: wsamqp load [flags] ws://host:port/ws")
		fs.PrintDefaults()
	}
	fs.IntVar(&cfg.clients, "clients", 100, "WebSocket clients to open")
	fs.IntVar(&cfg.senders, "senders", 0, "clients that also publish (default all); the rate is shared among them")
	fs.Float64Var(&cfg.rate, "rate", 1000, "total `messages` a second, paced by the wall clock")
	fs.DurationVar(&cfg.duration, "duration", 10*time.Second, "how long to publish")
	fs.IntVar(&cfg.size, "size", 64, "message size in `bytes` (at least 40: sender, sequence and send time)")
	fs.DurationVar(&cfg.drain, "drain", 5*time.Second, "how long to wait for the last deliveries after publishing ends")
	fs.BoolVar(&cfg.json, "json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("load: give exactly one ws:// URL")
	}
	cfg.url = fs.Arg(0)
	if u, err := url.Parse(cfg.url); err != nil || (u.Scheme != "ws" && u.Scheme != "wss") {
		return fmt.Errorf("load: %q is not a ws:// or wss:// URL", cfg.url)
	}
	if cfg.senders <= 0 || cfg.senders > cfg.clients {
		cfg.senders = cfg.clients
	}
	if cfg.clients <= 0 || cfg.rate <= 0 || cfg.size < 40 {
		return errors.New("load: need -clients > 0, -rate > 0 and -size >= 40")
	}
	res, err := load(ctx, cfg)
	if err != nil {
		return err
	}
	if cfg.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	_, err = fmt.Fprintln(stdout, res)
	return err
}

// loadClient is one client of a load run and what it saw.
type loadClient struct {
	conn      *websocket.Conn
	next      map[int]int              // per sender, one past the highest sequence number seen
	missing   map[int]map[int]struct{} // per sender, sequence numbers skipped over and not yet seen
	latencies []time.Duration
	dups      int
	reordered int
	delivered atomic.Int64 // read by the drain loop while the reader counts
}

// load runs one load test.
func load(ctx context.Context, cfg loadConfig) (loadResult, error) {
	clients := make([]*loadClient, cfg.clients)
	for i := range clients {
		conn, _, err := websocket.DefaultDialer.DialContext(ctx, cfg.url, nil)
		if err != nil {
			for _, c := range clients[:i] {
				c.conn.Close()
			}
			return loadResult{}, fmt.Errorf("load: client %d: %w", i, err)
		}
		clients[i] = &loadClient{conn: conn, next: map[int]int{}, missing: map[int]map[int]struct{}{}}
	}
	defer func() {
		for _, c := range clients {
			c.conn.Close()
		}
	}()

	// Every client reads until its connection is closed after the drain.
	var readers sync.WaitGroup
	for _, c := range clients {
		readers.Go(c.read)
	}

	// Senders pace themselves by the wall clock, taking turns: message j
	// of the run is due at start + j/rate, however late the one before it
	// went out, and sender s sends messages s, s+senders, s+2*senders...
	start := time.Now()
	stop := start.Add(cfg.duration)
	sent := make([]int, cfg.senders)
	var senders sync.WaitGroup
	for s := range cfg.senders {
		senders.Go(func() {
			timer := time.NewTimer(0)
			defer timer.Stop()
			pad := strings.Repeat("x", cfg.size)
			for k := 0; ; k++ {
				j := k*cfg.senders + s
				due := start.Add(time.Duration(float64(j) / cfg.rate * float64(time.Second)))
				if due.After(stop) || ctx.Err() != nil {
					return
				}
				timer.Reset(time.Until(due))
				<-timer.C
				msg := fmt.Sprintf("%d:%d:%d:", s, k, time.Now().UnixNano())
				msg += pad[:max(0, cfg.size-len(msg))]
				if clients[s].conn.WriteMessage(websocket.TextMessage, []byte(msg)) != nil {
					return
				}
				sent[s]++
			}
		})
	}
	senders.Wait()
	total := 0
	for _, n := range sent {
		total += n
	}
	expected := total * cfg.clients

	// Wait for the last deliveries: until everything came, or the drain
	// time passes.
	drainEnd := time.Now().Add(cfg.drain)
	for time.Now().Before(drainEnd) && delivered(clients) < expected {
		time.Sleep(10 * time.Millisecond) // polling interval
	}
	elapsed := time.Since(start)
	for _, c := range clients {
		c.conn.Close()
	}
	readers.Wait()

	res := loadResult{Clients: cfg.clients, Sent: total, Expected: expected}
	var all []time.Duration
	for _, c := range clients {
		res.Delivered += int(c.delivered.Load())
		res.Duplicated += c.dups
		res.Reordered += c.reordered
		all = append(all, c.latencies...)
	}
	res.Lost = expected - res.Delivered
	res.DeliveriesSec = float64(res.Delivered) / elapsed.Seconds()
	if len(all) > 0 {
		slices.Sort(all)
		ms := func(q float64) float64 {
			return float64(all[min(len(all)-1, int(q*float64(len(all))))]) / float64(time.Millisecond)
		}
		res.P50, res.P90, res.P99, res.Max = ms(0.50), ms(0.90), ms(0.99), ms(1)
	}
	return res, nil
}

// delivered counts the unique deliveries so far.
func delivered(clients []*loadClient) int {
	n := 0
	for _, c := range clients {
		n += int(c.delivered.Load())
	}
	return n
}

// read records every message the client receives; it runs on its own
// goroutine until the connection closes.
func (c *loadClient) read() {
	for {
		_, msg, err := c.conn.ReadMessage()
		if err != nil {
			return
		}
		now := time.Now()
		parts := strings.SplitN(string(msg), ":", 4)
		if len(parts) < 4 {
			continue // not the load tool's: someone else is chatting
		}
		s, err1 := strconv.Atoi(parts[0])
		k, err2 := strconv.Atoi(parts[1])
		ns, err3 := strconv.ParseInt(parts[2], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		if !c.record(s, k) {
			continue
		}
		c.latencies = append(c.latencies, now.Sub(time.Unix(0, ns)))
		c.delivered.Add(1)
	}
}

// record notes message k of sender s and reports whether it is new. Only
// the gaps are remembered, so memory stays small while messages come in
// order.
func (c *loadClient) record(s, k int) bool {
	next := c.next[s]
	switch {
	case k == next:
		c.next[s] = k + 1
	case k > next:
		if c.missing[s] == nil {
			c.missing[s] = map[int]struct{}{}
		}
		for gap := next; gap < k; gap++ {
			c.missing[s][gap] = struct{}{}
		}
		c.next[s] = k + 1
	default:
		if _, ok := c.missing[s][k]; !ok {
			c.dups++
			return false
		}
		delete(c.missing[s], k)
		c.reordered++
	}
	return true
}
