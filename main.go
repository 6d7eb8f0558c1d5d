// Wsamqp plugs WebSockets into AMQP through a small process bus, and serves
// a chat page on top. It is a Go port of two posts, "Plugging AMQP and
// WebSockets" and "A quick chat WebSockets/AMQP client".
//
// The pieces meet on the bus (bus.go). The AMQP plugin (amqp.go) reads a
// RabbitMQ stream bound to a fanout exchange, and publishes each message
// on the bus channel "amqp2ws"; the WebSocket hub (ws.go) listens there
// and writes it to the browsers of its room (the routing key). A browser's
// message goes the other way: the hub publishes it on "ws2amqp", and the
// AMQP plugin publishes it to the exchange. So a line shows up in a page
// only when the broker has sent it back, and browsers connected to
// different wsamqp processes chat together, since every process reads the
// same stream, each message at the same offset (rooms.go: history and
// resume).
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
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
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
		os.Exit(exitStatus(err))
	}
}

// exitStatus says in a number how the program ended: 2 for a command line
// it could not use, 70 (EX_SOFTWARE, as CherryPy's bus uses) when it
// stopped without finishing its work, such as browser messages the broker
// never confirmed, and 1 for any other failure.
func exitStatus(err error) int {
	switch {
	case errors.Is(err, errUsage):
		return 2
	case errors.Is(err, ErrExit):
		return 70
	}
	return 1
}

// config is everything the flags say.
type config struct {
	addr              string
	metricsAddr       string   // where /metrics and /debug/ are served; empty for addr
	pprof             bool     // serve Go's profiles at /debug/pprof/
	hosts             []string // host names the server answers to besides loopback ones; "*" for any
	readHeaderTimeout time.Duration
	maxHeaderBytes    int
	shutdownTimeout   time.Duration
	logLevel          slog.Level
	amqp              AMQPConfig
	ws                WSConfig
	broker            BrokerConfig
	brokerListen      string
}

// errUsage marks a command line the program cannot use; main exits with 2.
var errUsage = errors.New("usage")

// usageError names the flag at fault.
func usageError(flagName, format string, args ...any) error {
	return fmt.Errorf("%w: -%s: %s", errUsage, flagName, fmt.Sprintf(format, args...))
}

// parseFlags reads the command line; AMQP_URL stands in for -amqp and
// WSAMQP_BROKER_PASSWORD for -broker-password. Every limit is checked
// against its range here, so that a bad value stops the program at once
// with a message naming the flag.
func parseFlags(args []string, output io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("wsamqp", flag.ContinueOnError)
	fs.SetOutput(output)

	// Where to listen and what to talk to. Loopback by default, as the
	// posts' demo: serving a network is a choice made with -addr.
	fs.StringVar(&cfg.addr, "addr", "localhost:8888", "HTTP `address` to serve the chat page and /ws on")
	hosts := fs.String("hosts", "", "comma-separated host `names` the server answers to when -addr is not loopback (\"*\" for any); on loopback it answers to loopback names only")
	fs.StringVar(&cfg.metricsAddr, "metrics-addr", "", "serve /metrics and /debug/ on this `address` (e.g. 127.0.0.1:9464) instead of -addr")
	fs.BoolVar(&cfg.pprof, "pprof", false, "serve Go's profiles at /debug/pprof/, beside /metrics (they show the program's insides and cost CPU while taken)")
	fs.StringVar(&cfg.amqp.URL, "amqp", "", "AMQP broker `URLs`, comma-separated for the nodes of a cluster (default $AMQP_URL; none: the embedded broker)")
	fs.StringVar(&cfg.amqp.Exchange, "exchange", "wsamqp", "fanout `exchange` shared by every wsamqp process")
	origins := fs.String("origin", "", "comma-separated `origins` allowed to open /ws besides the page's own (e.g. https://chat.example.com)")
	fs.TextVar(&cfg.logLevel, "log-level", slog.LevelInfo, "log `level`: DEBUG, INFO, WARN or ERROR")

	// Limits on browsers.
	fs.Int64Var(&cfg.ws.MaxMessage, "max-message", 64<<10, "largest message in `bytes`, from a browser (larger close with 1009) or from the broker (larger are dropped)")
	fs.IntVar(&cfg.ws.SendQueue, "send-queue", 4096, "`messages` queued for one browser before it is cut off as too slow")
	fs.Int64Var(&cfg.ws.SendQueueBytes, "send-queue-bytes", 1<<20, "`bytes` queued for one browser before it is cut off as too slow")
	fs.IntVar(&cfg.ws.MaxConns, "max-conns", 10000, "browsers connected at once; more are refused with 503")
	fs.IntVar(&cfg.ws.MaxConnsPerIP, "max-conns-per-ip", 1024, "browsers connected at once from one IP address (behind a proxy on this machine, all come from loopback: raise it to -max-conns); more are refused with 429")
	fs.Float64Var(&cfg.ws.Rate, "rate", 50, "`messages` (pings included) a second one browser may send on average; more close with 1008 (0: no limit)")
	fs.IntVar(&cfg.ws.Burst, "burst", 500, "`messages` one browser may send at once above -rate")
	fs.DurationVar(&cfg.readHeaderTimeout, "read-header-timeout", 5*time.Second, "how long a client gets to send its HTTP request headers")
	fs.IntVar(&cfg.maxHeaderBytes, "max-header-bytes", 16<<10, "largest HTTP request header in `bytes`")
	fs.DurationVar(&cfg.ws.WriteWait, "write-wait", 10*time.Second, "bounds one write to a browser")
	fs.DurationVar(&cfg.ws.PongWait, "pong-wait", 60*time.Second, "how long a silent browser is kept; at least twice -write-wait")
	fs.IntVar(&cfg.ws.History, "history", 50, "`lines` of its room a wsamqp.v1 browser gets on joining, unless it asks (?history=K)")
	fs.IntVar(&cfg.ws.HistoryMax, "history-max", 1000, "the most `lines` a browser may ask for, and the lines kept in memory per room")
	fs.Int64Var(&cfg.ws.CacheBytes, "history-bytes", 64<<20, "`bytes` of lines kept in memory for all rooms, for history and quick resumes")

	// Limits on the broker link.
	fs.IntVar(&cfg.amqp.Outbox, "outbox", 4096, "browser `messages` held for the broker; when full, senders wait while the broker is up and get 1013 while it is away")
	fs.Int64Var(&cfg.amqp.OutboxBytes, "outbox-bytes", 16<<20, "browser message `bytes` held for the broker, as -outbox")
	fs.IntVar(&cfg.amqp.Prefetch, "prefetch", 256, "unacknowledged deliveries from the broker")
	fs.StringVar(&cfg.amqp.Stream, "stream", "wsamqp.chat", "the `stream` bound to -exchange that every process reads: the chat's history")
	fs.IntVar(&cfg.amqp.Replicas, "stream-replicas", 3, "the stream's `replicas` on a RabbitMQ cluster (x-initial-cluster-size), when this process declares it; a single node keeps one")
	fs.Int64Var(&cfg.amqp.StreamBytes, "stream-max-bytes", 256<<20, "the stream's retention in `bytes`, when this process declares it")
	fs.StringVar(&cfg.amqp.StreamAge, "stream-max-age", "7D", "the stream's retention in `age` (Y, M, D, h, m or s; empty for none), when this process declares it")
	fs.Int64Var(&cfg.amqp.SegmentBytes, "stream-segment-bytes", 1<<20, "the stream's segment size in `bytes`: retention drops whole segments, so they are small at chat scale")
	fs.DurationVar(&cfg.amqp.StreamWait, "stream-wait", time.Second, "how long a read of the stream waits for a message before it takes the stream to hold no more (an empty stream sends nothing)")
	fs.Int64Var(&cfg.ws.ReplayBytes, "replay-bytes", 4<<20, "the most one resuming browser is sent from the stream, in `bytes`; past it the oldest are left out and it is told of a gap")
	fs.DurationVar(&cfg.amqp.MaxBackoff, "max-backoff", 10*time.Second, "longest wait between reconnection attempts")
	fs.DurationVar(&cfg.amqp.Timeout, "amqp-timeout", 5*time.Second, "bounds a broker connection's handshake and topology declaration; a node that takes longer is left for the next")
	fs.DurationVar(&cfg.amqp.DrainTimeout, "drain-timeout", 10*time.Second, "on shutdown, how long to wait for the broker to confirm what browsers sent")
	fs.DurationVar(&cfg.shutdownTimeout, "shutdown-timeout", 5*time.Second, "on shutdown, how long browsers get to leave")

	// The embedded broker, used when no broker URL is given.
	fs.StringVar(&cfg.brokerListen, "broker-listen", "", "also serve the embedded broker to AMQP clients on this TCP `address` (e.g. 127.0.0.1:5673)")
	fs.StringVar(&cfg.broker.User, "broker-user", "guest", "embedded broker: the account's `user` (guest may connect only from loopback)")
	fs.StringVar(&cfg.broker.Password, "broker-password", "", "embedded broker: the account's `password` (default $WSAMQP_BROKER_PASSWORD, or guest for guest)")
	fs.IntVar(&cfg.broker.MaxQueueLength, "broker-max-queue", 100_000, "embedded broker: ready `messages` a queue holds before dropping the oldest")
	fs.Int64Var(&cfg.broker.MaxQueueBytes, "broker-max-queue-bytes", 64<<20, "embedded broker: ready message `bytes` a queue holds before dropping the oldest")
	fs.Int64Var(&cfg.broker.MaxMemory, "broker-max-memory", 256<<20, "embedded broker: message `bytes` held in all before publishes are refused")
	fs.IntVar(&cfg.broker.MaxConns, "broker-max-conns", 1000, "embedded broker: client connections at once")
	fs.IntVar(&cfg.broker.ChannelMax, "broker-channel-max", 2047, "embedded broker: AMQP channels per connection")
	fs.IntVar(&cfg.broker.MaxQueues, "broker-max-queues", 10_000, "embedded broker: queues at once")
	fs.IntVar(&cfg.broker.MaxExchanges, "broker-max-exchanges", 10_000, "embedded broker: exchanges at once")
	fs.IntVar(&cfg.broker.MaxConsumers, "broker-max-consumers", 100_000, "embedded broker: consumers at once")

	for _, r := range flagRanges {
		f := fs.Lookup(r.name)
		f.Usage += fmt.Sprintf(" [%v, %v]", r.min, r.max)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cfg, err
		}
		return cfg, fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("%w: unexpected arguments: %q", errUsage, fs.Args())
	}
	set := flagSet{fs, map[string]bool{}}
	fs.Visit(func(f *flag.Flag) { set.given[f.Name] = true })
	// Secrets are read after parsing, not as the flags' defaults, which
	// -h would print, passwords and all.
	urlFlag := "amqp"
	if cfg.amqp.URL == "" {
		cfg.amqp.URL, urlFlag = os.Getenv("AMQP_URL"), "amqp (from $AMQP_URL)"
	}
	if cfg.broker.Password == "" {
		cfg.broker.Password = os.Getenv("WSAMQP_BROKER_PASSWORD")
	}
	if cfg.broker.Password == "" && cfg.broker.User == "guest" {
		cfg.broker.Password = "guest"
	}
	cfg.ws.Origins = splitList(*origins)
	cfg.hosts = splitList(*hosts)
	cfg.ws.CloseTimeout = cfg.shutdownTimeout
	if err := cfg.validate(set, urlFlag); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// flagSet is the parsed flags, with which of them the command line gave.
type flagSet struct {
	*flag.FlagSet
	given map[string]bool
}

// flagRange is the range a numeric flag must be in. -h shows it after the
// flag's usage, and parseFlags refuses a value outside it.
type flagRange struct {
	name     string
	min, max any // of the flag's own type: int, int64, float64 or time.Duration
}

// flagRanges are the ranges of the numeric flags: wide enough for any
// sensible deployment, narrow enough that no value breaks an assumption
// (a ticker of 0, a queue of -1, RabbitMQ's 32-bit milliseconds).
var flagRanges = []flagRange{
	{"max-message", int64(1), int64(16 << 20)},
	{"send-queue", 1, 1 << 20},
	{"send-queue-bytes", int64(1 << 10), int64(1 << 30)},
	{"max-conns", 1, 1 << 20},
	{"max-conns-per-ip", 1, 1 << 20},
	{"rate", 0.0, 1e6},
	{"burst", 1, 1 << 20},
	{"max-header-bytes", 1 << 10, 1 << 20},
	{"read-header-timeout", time.Millisecond, time.Hour},
	{"write-wait", time.Millisecond, time.Hour},
	{"pong-wait", 2 * time.Millisecond, 24 * time.Hour},
	{"outbox", 1, 1 << 20},
	{"outbox-bytes", int64(1 << 10), int64(1 << 32)},
	{"prefetch", 1, 65535},
	{"stream-max-bytes", int64(1 << 20), int64(1 << 50)},
	{"stream-segment-bytes", int64(4 << 10), int64(1 << 31)},
	{"replay-bytes", int64(64 << 10), int64(1 << 30)},
	{"stream-wait", 10 * time.Millisecond, time.Minute},
	{"stream-replicas", 1, 255},
	{"history", 0, 1 << 20},
	{"history-max", 0, 1 << 20},
	{"history-bytes", int64(0), int64(1 << 40)},
	{"max-backoff", 100 * time.Millisecond, time.Hour},
	{"amqp-timeout", 100 * time.Millisecond, 5 * time.Minute},
	{"drain-timeout", time.Duration(0), time.Hour},
	{"shutdown-timeout", time.Duration(0), time.Hour},
	{"broker-max-queue", 1, math.MaxInt32},
	{"broker-max-queue-bytes", int64(1 << 10), int64(1 << 40)},
	{"broker-max-memory", int64(1 << 20), int64(1 << 40)},
	{"broker-max-conns", 1, 1 << 20},
	{"broker-channel-max", 1, 65535},
	{"broker-max-queues", 1, 1 << 24},
	{"broker-max-exchanges", 5, 1 << 24}, // the default exchange and amq.* count too
	{"broker-max-consumers", 1, 1 << 24},
}

// check refuses f's value if it is outside r.
func (r flagRange) check(f *flag.Flag) error {
	v := f.Value.(flag.Getter).Get()
	var out bool
	switch v := v.(type) {
	case int:
		out = v < r.min.(int) || v > r.max.(int)
	case int64:
		out = v < r.min.(int64) || v > r.max.(int64)
	case float64:
		out = !(v >= r.min.(float64) && v <= r.max.(float64)) // NaN is out too
	case time.Duration:
		out = v < r.min.(time.Duration) || v > r.max.(time.Duration)
	default:
		panic(fmt.Sprintf("flag -%s: no range check for %T", r.name, v))
	}
	if out {
		return usageError(r.name, "%v is out of range [%v, %v]", v, r.min, r.max)
	}
	return nil
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var items []string
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			items = append(items, item)
		}
	}
	return items
}

// validate checks every value against its range. set says which flags
// the command line gave; urlFlag names where the AMQP URL came from.
func (cfg *config) validate(set flagSet, urlFlag string) error {
	for _, r := range flagRanges {
		if err := r.check(set.Lookup(r.name)); err != nil {
			return err
		}
	}
	switch {
	case cfg.ws.PongWait < 2*cfg.ws.WriteWait:
		return usageError("pong-wait", "%v must be at least twice -write-wait (%v): a ping may wait behind one write", cfg.ws.PongWait, cfg.ws.WriteWait)
	case cfg.ws.SendQueueBytes < cfg.ws.MaxMessage:
		return usageError("send-queue-bytes", "%d is less than -max-message (%d): a browser could not be sent one message", cfg.ws.SendQueueBytes, cfg.ws.MaxMessage)
	case cfg.amqp.OutboxBytes < cfg.ws.MaxMessage:
		return usageError("outbox-bytes", "%d is less than -max-message (%d): one message would never fit", cfg.amqp.OutboxBytes, cfg.ws.MaxMessage)
	case cfg.amqp.Exchange == "" || len(cfg.amqp.Exchange) > 255:
		return usageError("exchange", "%q must be 1 to 255 bytes", cfg.amqp.Exchange)
	case cfg.amqp.Stream == "" || len(cfg.amqp.Stream) > 255:
		return usageError("stream", "%q must be 1 to 255 bytes", cfg.amqp.Stream)
	case cfg.ws.History > cfg.ws.HistoryMax:
		return usageError("history", "%d is more than -history-max (%d)", cfg.ws.History, cfg.ws.HistoryMax)
	case cfg.broker.User == "" || len(cfg.broker.User) > 255:
		return usageError("broker-user", "must be 1 to 255 bytes")
	}
	if _, _, err := net.SplitHostPort(cfg.addr); err != nil {
		return usageError("addr", "%v", err)
	}
	if cfg.metricsAddr != "" {
		if _, _, err := net.SplitHostPort(cfg.metricsAddr); err != nil {
			return usageError("metrics-addr", "%v", err)
		}
	}
	if !isLoopbackAddr(cfg.addr) && len(cfg.hosts) == 0 {
		return usageError("hosts", "-addr %s serves a network: give the host names browsers reach it by (e.g. -hosts chat.example.com,192.0.2.10), or \"*\" for any; without them a page on any site could reach the chat through DNS rebinding", cfg.addr)
	}
	for _, o := range cfg.ws.Origins {
		if u, err := url.Parse(o); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" {
			return usageError("origin", "%q is not an origin such as https://chat.example.com", o)
		}
	}
	if cfg.amqp.URL != "" {
		if set.given["broker-listen"] {
			return usageError("broker-listen", "serves the embedded broker, which is not used with -amqp or $AMQP_URL")
		}
		// A URL that does not parse is never printed: it may hold a
		// password, and a password with "#", "/" or "%" is what makes
		// URLs fail to parse.
		urls := splitList(cfg.amqp.URL)
		if len(urls) == 0 {
			return usageError(urlFlag, "no AMQP URL")
		}
		for i, raw := range urls {
			if u, err := amqp.ParseURI(raw); err != nil {
				return usageError(urlFlag, "URL %d of %d is not a valid AMQP URL (%s); it is not shown, since it may hold a password: percent-encode special characters in the password", i+1, len(urls), urlProblem(err))
			} else if u.Host == "" {
				return usageError(urlFlag, "URL %d of %d has no host", i+1, len(urls))
			}
		}
	}
	if cfg.amqp.StreamAge != "" {
		if _, err := parseStreamAge(cfg.amqp.StreamAge); err != nil {
			return usageError("stream-max-age", "%v", err)
		}
	}
	if cfg.brokerListen != "" {
		if _, _, err := net.SplitHostPort(cfg.brokerListen); err != nil {
			return usageError("broker-listen", "%v", err)
		}
		if !isLoopbackAddr(cfg.brokerListen) && cfg.broker.User == "guest" {
			return usageError("broker-listen", "%s is not a loopback address, and guest may connect only from loopback: set -broker-user and $WSAMQP_BROKER_PASSWORD", cfg.brokerListen)
		}
	}
	return nil
}

// urlProblem says what is wrong with an AMQP URL without quoting it.
func urlProblem(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		var esc url.EscapeError
		if errors.As(ue.Err, &esc) {
			return "a bad percent-escape"
		}
		return "it does not parse"
	}
	if strings.Contains(err.Error(), "scheme") {
		return "the scheme must be amqp:// or amqps://"
	}
	return "it does not parse"
}

// isLoopbackAddr reports whether a listening address is on loopback only:
// "localhost:8888", "127.0.0.1:0", "[::1]:8888".
func isLoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
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
	logger := slog.New(newLimitedHandler(slog.NewTextHandler(stdout, &slog.HandlerOptions{Level: cfg.logLevel})))
	b := NewBus(logger)
	if cfg.amqp.URL == "" {
		cfg.broker.Logger = logger.With("part", "broker")
		if err := startEmbeddedBroker(b, &cfg); err != nil {
			return err
		}
	}

	br := newBridge(b, cfg.amqp, cfg.ws)
	if cfg.pprof {
		br.profile()
	}
	handler := br.handler
	if cfg.metricsAddr != "" {
		handler = withoutDebug(br.handler)
		serveOn(b, "metrics", cfg.metricsAddr, checkHost(br.debug, cfg.hosts), cfg, logger)
	}
	serveOn(b, "chat", cfg.addr, checkHost(handler, cfg.hosts), cfg, logger)

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
	cfg.amqp.URL = (&url.URL{Scheme: "amqp", User: url.UserPassword(cfg.broker.User, cfg.broker.Password), Host: "embedded", Path: "/"}).String()
	cfg.amqp.Dial = broker.Dial
	b.Subscribe(ChannelExit, "broker", DefaultPriority, func(...any) (any, error) { return nil, broker.Close() })
	b.Log("no -amqp flag or AMQP_URL: using the embedded broker; give -amqp amqp://user:password@host:5672/ to use RabbitMQ", slog.LevelInfo)
	if cfg.amqp.StreamAge != "" {
		if _, err := parseStreamAge(cfg.amqp.StreamAge); err != nil {
			return usageError("stream-max-age", "%v", err)
		}
	}
	if cfg.brokerListen != "" {
		addr, err := broker.Listen(cfg.brokerListen)
		if err != nil {
			broker.Close()
			return err
		}
		b.Log("embedded broker listening", slog.LevelInfo, "url", "amqp://"+cfg.broker.User+":xxxxx@"+addr.String()+"/")
	}
	return nil
}

// withoutDebug answers 404 for /metrics and /debug/, which -metrics-addr
// moved to another address.
func withoutDebug(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/metrics" || strings.HasPrefix(r.URL.Path, "/debug/") {
			http.NotFound(w, r)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// serveOn serves h on addr while the bus runs: it listens when the bus
// starts, after the broker link is up, and stops taking requests when the
// bus stops, before the hub says goodbye to the browsers it already has.
func serveOn(b *Bus, name, addr string, h http.Handler, cfg config, logger *slog.Logger) {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: cfg.readHeaderTimeout, // a slowloris gets this long to send its headers
		MaxHeaderBytes:    cfg.maxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	b.Subscribe(ChannelStart, name, PriorityWebStart, func(...any) (any, error) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("%s listen: %w", name, err)
		}
		b.Log("serving "+name, slog.LevelInfo, "url", "http://"+displayAddr(ln.Addr()))
		go srv.Serve(ln)
		return nil, nil
	})
	b.Subscribe(ChannelStop, name, PriorityWebStop-1, func(...any) (any, error) {
		shutdown, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
		defer cancel()
		return nil, srv.Shutdown(shutdown)
	})
}

// checkHost answers only requests for the host names the server is
// reached by. A page on another site can make a browser send requests to
// 127.0.0.1 under its own name (DNS rebinding), and then Origin and Host
// agree; the Host header is what tells. On loopback the server answers to
// loopback names (localhost, 127.0.0.1, [::1]) and those in hosts; "*" in
// hosts answers to any.
func checkHost(h http.Handler, hosts []string) http.Handler {
	if slices.Contains(hosts, "*") {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := r.Host
		if host, _, err := net.SplitHostPort(r.Host); err == nil {
			name = host
		}
		name = strings.TrimSuffix(strings.ToLower(name), ".")
		ip := net.ParseIP(strings.Trim(name, "[]"))
		if name == "localhost" || (ip != nil && ip.IsLoopback()) || slices.ContainsFunc(hosts, func(h string) bool { return strings.EqualFold(h, name) }) {
			h.ServeHTTP(w, r)
			return
		}
		http.Error(w, "unknown host: this server answers to its own names only (see -hosts)", http.StatusMisdirectedRequest)
	})
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
	metrics *Metrics
	handler http.Handler   // the page, /ws, /healthz, /metrics and /debug/
	debug   *http.ServeMux // /metrics and /debug/ alone, for -metrics-addr
}

// newBridge creates the AMQP plugin and the hub and subscribes them to b.
func newBridge(b *Bus, amqpCfg AMQPConfig, wsCfg WSConfig) *bridge {
	br := &bridge{bus: b, amqp: NewAMQPPlugin(b, amqpCfg), hub: NewHub(b, wsCfg), metrics: NewMetrics()}
	br.amqp.metrics, br.hub.metrics = br.metrics, br.metrics
	br.metrics.register(br)
	br.amqp.Subscribe()
	br.hub.Subscribe()

	page, _ := fs.Sub(static, "static")
	files := securityHeaders(http.FileServerFS(page))
	debug := http.NewServeMux()
	debug.Handle("GET /metrics", br.metrics.handler())
	debug.HandleFunc("GET /debug/state", br.debugStateHandler)
	debug.Handle("GET /debug/", files)
	br.debug = debug

	mux := http.NewServeMux()
	mux.Handle("GET /", files)
	mux.Handle("GET /ws", br.hub)
	mux.HandleFunc("GET /healthz", br.healthz)
	mux.Handle("GET /metrics", debug)
	mux.Handle("GET /debug/", debug)
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
		Node     string `json:"node"` // the broker node it is on, or was on last
		Browsers int    `json:"browsers"`
	}{state.String(), "down", br.amqp.Node(), br.hub.Clients()}
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
