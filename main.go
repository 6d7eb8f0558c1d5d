// Wsamqp plugs WebSockets into AMQP through a small process bus, and serves
// a chat page on top. It is a Go port of two posts, "Plugging AMQP and
// WebSockets" and "A quick chat WebSockets/AMQP client".
//
// The pieces meet on the bus (bus.go). The AMQP plugin (amqp.go) consumes
// this process's own queue, bound to a fanout exchange, and publishes each
// message on the bus channel "amqp2ws"; the WebSocket hub (ws.go) listens
// there and writes it to every browser. A browser's message goes the other
// way: the hub publishes it on "ws2amqp", and the AMQP plugin publishes it
// to the exchange. So a line shows up in a page only when the broker has
// sent it back, and browsers connected to different wsamqp processes chat
// together, since every process has its own queue on the exchange.
//
// Usage:
//
//	go run .                              # embedded broker, chat at http://localhost:8888/
//	go run . -amqp amqp://guest:guest@localhost:5672/
//	go run . -h                           # every flag and limit
//	go run . load ws://127.0.0.1:8888/ws  # the load tool; go run . load -h
package main

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	err := run(context.Background(), os.Args[1:], os.Stdout)
	if errors.Is(err, ErrRestart) {
		err = Reexec()
	}
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "wsamqp:", err)
		os.Exit(1)
	}
}

// config is everything the flags say.
type config struct {
	addr              string
	readHeaderTimeout time.Duration
	shutdownTimeout   time.Duration
	logLevel          slog.Level
	amqp              AMQPConfig
	ws                WSConfig
	broker            BrokerConfig
	brokerListen      string
}

// parseFlags reads the command line; AMQP_URL stands in for -amqp.
func parseFlags(args []string, output io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("wsamqp", flag.ContinueOnError)
	fs.SetOutput(output)

	// Where to listen and what to talk to.
	fs.StringVar(&cfg.addr, "addr", ":8888", "HTTP `address` to serve the chat page and /ws on")
	fs.StringVar(&cfg.amqp.URL, "amqp", "", "AMQP broker `URL` (default $AMQP_URL)")
	fs.StringVar(&cfg.amqp.Exchange, "exchange", "wsamqp", "fanout `exchange` shared by every wsamqp process")
	origins := fs.String("origin", "", "comma-separated `origins` allowed to open /ws besides the page's own (e.g. https://chat.example.com)")
	fs.TextVar(&cfg.logLevel, "log-level", slog.LevelInfo, "log `level`: DEBUG, INFO, WARN or ERROR")

	// Limits on browsers.
	fs.Int64Var(&cfg.ws.MaxMessage, "max-message", 64<<10, "largest browser message in `bytes`; larger ones close with 1009")
	fs.IntVar(&cfg.ws.SendQueue, "send-queue", 256, "`messages` queued for one browser before it is cut off as too slow")
	fs.IntVar(&cfg.ws.MaxConns, "max-conns", 10000, "browsers connected at once; more are refused with 503")
	fs.Float64Var(&cfg.ws.Rate, "rate", 50, "`messages` a second one browser may send on average; more close with 1008 (0: no limit)")
	fs.IntVar(&cfg.ws.Burst, "burst", 500, "`messages` one browser may send at once above -rate")
	fs.DurationVar(&cfg.readHeaderTimeout, "read-header-timeout", 5*time.Second, "how long a client gets to send its HTTP request headers")
	fs.DurationVar(&cfg.ws.WriteWait, "write-wait", 10*time.Second, "bounds one write to a browser")
	fs.DurationVar(&cfg.ws.PongWait, "pong-wait", 60*time.Second, "how long a silent browser is kept (pinged at 9/10 of it)")

	// Limits on the broker link.
	fs.IntVar(&cfg.amqp.Outbox, "outbox", 4096, "browser `messages` held while the broker is away; more close with 1013")
	fs.IntVar(&cfg.amqp.Prefetch, "prefetch", 256, "unacknowledged deliveries from the broker")
	fs.DurationVar(&cfg.amqp.QueueExpires, "queue-expires", time.Minute, "how long this process's queue outlives a lost connection, keeping what is sent meanwhile")
	fs.IntVar(&cfg.amqp.QueueLength, "queue-length", 100_000, "`messages` this process's queue keeps while it is away; the oldest go first")
	fs.DurationVar(&cfg.amqp.MaxBackoff, "max-backoff", 10*time.Second, "longest wait between reconnection attempts")
	fs.DurationVar(&cfg.amqp.DrainTimeout, "drain-timeout", 10*time.Second, "on shutdown, how long to wait for the broker to confirm what browsers sent")
	fs.DurationVar(&cfg.shutdownTimeout, "shutdown-timeout", 5*time.Second, "on shutdown, how long browsers get to leave")

	// The embedded broker, used when no broker URL is given.
	fs.StringVar(&cfg.brokerListen, "broker-listen", "", "also serve the embedded broker to AMQP clients on this TCP `address` (e.g. 127.0.0.1:5673)")
	fs.IntVar(&cfg.broker.MaxQueueLength, "broker-max-queue", 100_000, "embedded broker: ready `messages` a queue holds before dropping the oldest")

	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if cfg.amqp.URL == "" {
		cfg.amqp.URL = os.Getenv("AMQP_URL") // not the flag's default, which -h would print, password and all
	}
	for o := range strings.SplitSeq(*origins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			cfg.ws.Origins = append(cfg.ws.Origins, o)
		}
	}
	cfg.ws.CloseTimeout = cfg.shutdownTimeout
	return cfg, nil
}

// run is the program: it wires the plugins to a bus, starts it, and blocks
// until the bus exits, by signal or because ctx is done. With "load" as its
// first argument it is the load tool instead (load.go).
func run(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) > 0 && args[0] == "load" {
		return runLoad(ctx, args[1:], stdout)
	}
	cfg, err := parseFlags(args, stdout)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stdout, &slog.HandlerOptions{Level: cfg.logLevel}))
	b := NewBus(logger)
	if cfg.amqp.URL == "" {
		if err := startEmbeddedBroker(b, &cfg); err != nil {
			return err
		}
	}

	br := newBridge(b, cfg.amqp, cfg.ws)
	srv := &http.Server{
		Addr:              cfg.addr,
		Handler:           br.handler,
		ReadHeaderTimeout: cfg.readHeaderTimeout, // a slowloris gets this long to send its headers
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	b.Subscribe(ChannelStart, "http", PriorityWebStart, func(...any) (any, error) {
		ln, err := net.Listen("tcp", cfg.addr)
		if err != nil {
			return nil, fmt.Errorf("http listen: %w", err)
		}
		b.Log("serving chat", slog.LevelInfo, "url", "http://"+displayAddr(ln.Addr()))
		go srv.Serve(ln)
		return nil, nil
	})
	// The server stops taking requests before the hub says goodbye to the
	// browsers it already has.
	b.Subscribe(ChannelStop, "http", PriorityWebStop-1, func(...any) (any, error) {
		shutdown, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
		defer cancel()
		return nil, srv.Shutdown(shutdown)
	})

	NewSignalHandler(b).Subscribe()
	stop := context.AfterFunc(ctx, b.Exit)
	defer stop()
	if err := b.Start(); err != nil {
		return err
	}
	return b.Block(time.Second)
}

// startEmbeddedBroker starts the in-process broker, points the AMQP plugin
// at it, and closes it when the bus exits, after the plugin has stopped.
func startEmbeddedBroker(b *Bus, cfg *config) error {
	broker := NewBroker(cfg.broker)
	cfg.amqp.URL = "amqp://guest:guest@embedded/"
	cfg.amqp.Dial = broker.Dial
	b.Subscribe(ChannelExit, "broker", DefaultPriority, func(...any) (any, error) { return nil, broker.Close() })
	b.Log("no -amqp flag or AMQP_URL: using the embedded broker; give -amqp amqp://user:password@host:5672/ to use RabbitMQ", slog.LevelInfo)
	if cfg.brokerListen != "" {
		addr, err := broker.Listen(cfg.brokerListen)
		if err != nil {
			broker.Close()
			return err
		}
		b.Log("embedded broker listening", slog.LevelInfo, "url", "amqp://guest:xxxxx@"+addr.String()+"/")
	}
	return nil
}

// displayAddr turns a listening address into one a browser can open.
func displayAddr(a net.Addr) string {
	host, port, err := net.SplitHostPort(a.String())
	if err != nil || host == "::" || host == "0.0.0.0" {
		return "localhost:" + port
	}
	return net.JoinHostPort(host, port)
}

//go:embed static
var static embed.FS

// bridge is one wsamqp process's plugins on one bus, with the HTTP handler
// that serves the page, /ws and /healthz.
type bridge struct {
	bus     *Bus
	amqp    *AMQPPlugin
	hub     *Hub
	handler http.Handler
}

// newBridge creates the AMQP plugin and the hub and subscribes them to b.
func newBridge(b *Bus, amqpCfg AMQPConfig, wsCfg WSConfig) *bridge {
	br := &bridge{bus: b, amqp: NewAMQPPlugin(b, amqpCfg), hub: NewHub(b, wsCfg)}
	br.amqp.Subscribe()
	br.hub.Subscribe()

	page, _ := fs.Sub(static, "static")
	mux := http.NewServeMux()
	mux.Handle("GET /", securityHeaders(http.FileServerFS(page)))
	mux.Handle("GET /ws", br.hub)
	mux.HandleFunc("GET /healthz", br.healthz)
	br.handler = mux
	return br
}

// securityHeaders lets the page run only its own script and talk only to
// its own origin, and keeps it out of frames.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

// healthz answers 200 when the bus is STARTED and the broker link is up,
// 503 otherwise, saying which in JSON.
func (br *bridge) healthz(w http.ResponseWriter, r *http.Request) {
	state, up := br.bus.State(), br.amqp.Connected()
	health := struct {
		Bus      string `json:"bus"`
		AMQP     string `json:"amqp"`
		Browsers int    `json:"browsers"`
	}{state.String(), "down", br.hub.Clients()}
	if up {
		health.AMQP = "up"
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if state != StateStarted || !up {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(health)
}
