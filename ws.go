package main

// The WebSocket side of "Plugging AMQP and WebSockets": the post's Tornado
// WSHandler, whose on_message publishes browser messages on the bus
// (ws2amqp) and whose push_message writes bus messages (amqp2ws) to the
// browser.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
)

// Bus priorities of the web side: browsers leave before the AMQP plugin
// drains its outbox, so that nothing they sent is left behind.
const (
	PriorityWebStart = 60 // after PriorityAMQPStart
	PriorityWebStop  = 40 // before PriorityAMQPStop
)

// WSConfig holds the limits of the WebSocket handler.
type WSConfig struct {
	MaxMessage int64         // largest browser message, in bytes
	SendQueue  int           // messages queued for one browser before it is too slow
	MaxConns   int           // browsers connected at once
	Rate       float64       // messages a second one browser may send on average; 0 for no limit
	Burst      int           // messages one browser may send at once, above Rate
	WriteWait  time.Duration // bounds one write to a browser
	PongWait   time.Duration // how long a browser may stay silent, pongs included
	Origins    []string      // origins allowed besides the page's own ("https://example.com")

	CloseTimeout time.Duration // bounds how long browsers get to leave on shutdown
}

// pingPeriod is how often browsers are pinged. Must be less than PongWait,
// so that a live browser's pong arrives before its read deadline.
func (cfg WSConfig) pingPeriod() time.Duration { return cfg.PongWait * 9 / 10 }

// closeWait bounds how long a closing connection waits for the browser's
// answering close frame before it drops the TCP connection.
const closeWait = 2 * time.Second

// Hub is the WebSocket handler: it upgrades browsers at /ws, moves their
// messages onto the bus, and fans every amqp2ws message out to all of them.
type Hub struct {
	bus      *Bus
	cfg      WSConfig
	upgrader websocket.Upgrader

	// mu guards clients and closing.
	mu      sync.Mutex
	clients map[*client]struct{}
	closing bool // Close has begun; new browsers are turned away

	wg sync.WaitGroup // one count per reader and per writer goroutine; added to under mu while !closing
}

// NewHub returns the WebSocket handler for b. Call Subscribe to plug it in.
func NewHub(b *Bus, cfg WSConfig) *Hub {
	h := &Hub{bus: b, cfg: cfg, clients: make(map[*client]struct{})}
	h.upgrader = websocket.Upgrader{
		ReadBufferSize:  1024,
		WriteBufferSize: 1024,
		// Idle browsers hold no write buffer: it is taken from the pool
		// for the length of one write.
		WriteBufferPool: &sync.Pool{},
		CheckOrigin:     h.checkOrigin,
	}
	return h
}

// Subscribe plugs the hub into the bus: every amqp2ws message goes to
// every browser, and browsers are sent away when the bus stops.
func (h *Hub) Subscribe() {
	h.bus.Subscribe(ChannelStart, "ws", PriorityWebStart, func(...any) (any, error) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.closing = false
		return nil, nil
	})
	h.bus.Subscribe(ChannelStop, "ws", PriorityWebStop, func(...any) (any, error) {
		h.Close(time.Now().Add(h.cfg.CloseTimeout))
		return nil, nil
	})
	h.bus.Subscribe(ChannelAMQP2WS, "ws", DefaultPriority, func(args ...any) (any, error) {
		return nil, h.broadcast(args[0].([]byte))
	})
}

// checkOrigin allows handshakes from the page's own origin, from the
// origins in cfg.Origins, and from clients that send no Origin (they are
// not browsers, so there is no cross-site request to forge).
func (h *Hub) checkOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil {
		return false
	}
	return strings.EqualFold(u.Host, r.Host) || slices.Contains(h.cfg.Origins, origin)
}

// Clients returns how many browsers are connected.
func (h *Hub) Clients() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.clients)
}

// ServeHTTP upgrades a browser to a WebSocket and starts its reader and
// writer goroutines.
func (h *Hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// The browser joins the hub before the handshake answer goes out, so
	// that every message broadcast after its "open" event reaches it; what
	// arrives meanwhile waits in its queue for the writer.
	c := &client{
		hub:      h,
		remote:   r.RemoteAddr,
		send:     make(chan *websocket.PreparedMessage, h.cfg.SendQueue),
		quit:     make(chan struct{}),
		readDone: make(chan struct{}),
	}
	h.mu.Lock()
	refuse := ""
	switch {
	case h.closing:
		refuse = "server shutting down"
	case len(h.clients) >= h.cfg.MaxConns:
		refuse = fmt.Sprintf("too many connections (limit %d)", h.cfg.MaxConns)
	default:
		h.clients[c] = struct{}{}
	}
	h.mu.Unlock()
	if refuse != "" {
		http.Error(w, refuse, http.StatusServiceUnavailable)
		return
	}

	hj := &hijacker{ResponseWriter: w}
	conn, err := h.upgrader.Upgrade(hj, r, nil) // on failure it has answered 400 or 403
	h.mu.Lock()
	closing := h.closing
	if err != nil || closing {
		delete(h.clients, c)
	} else {
		c.conn, c.batch = conn, hj.conn
		h.wg.Add(2) // never once Close has set closing, so never during its Wait
	}
	h.mu.Unlock()
	switch {
	case err != nil:
		h.bus.Log("websocket handshake refused", slog.LevelInfo, "remote", c.remote, "err", err)
	case closing:
		// Close began while the handshake was under way, and may already
		// be waiting on h.wg: say goodbye here rather than start goroutines.
		conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseGoingAway, "server shutting down"), time.Now().Add(h.cfg.WriteWait))
		conn.Close()
	default:
		go c.writeLoop()
		go c.readLoop()
	}
}

// broadcast frames body once and queues it for every browser. A browser
// whose queue is full is too slow: it is disconnected, never waited for.
// It runs on the AMQP plugin's consuming goroutine.
func (h *Hub) broadcast(body []byte) error {
	if !utf8.Valid(body) {
		return errors.New("ws: broker message is not valid UTF-8; browsers only take text")
	}
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, body)
	if err != nil {
		return fmt.Errorf("ws: prepare message: %w", err)
	}
	var slow []*client
	h.mu.Lock()
	for c := range h.clients {
		select {
		case c.send <- pm:
		default:
			if c.close(websocket.ClosePolicyViolation, "too slow: send queue full") {
				slow = append(slow, c)
			}
		}
	}
	h.mu.Unlock()
	for _, c := range slow {
		h.bus.Log("browser cut off as too slow", slog.LevelWarn, "remote", c.remote, "queue", h.cfg.SendQueue)
	}
	return nil
}

// Close says goodbye to every browser with 1001 (going away), after the
// messages already queued for it, and waits until they have all left or
// the deadline passes, when it drops those that remain.
func (h *Hub) Close(deadline time.Time) {
	h.mu.Lock()
	h.closing = true
	for c := range h.clients {
		c.close(websocket.CloseGoingAway, "server shutting down")
	}
	h.mu.Unlock()

	left := make(chan struct{})
	go func() {
		h.wg.Wait()
		close(left)
	}()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-left:
	case <-t.C:
		h.mu.Lock()
		for c := range h.clients {
			if c.conn != nil {
				c.conn.Close()
			}
		}
		h.mu.Unlock()
		<-left
	}
}

// client is a middleman between one browser's WebSocket and the hub.
type client struct {
	hub    *Hub
	remote string          // the browser's address, for the log
	conn   *websocket.Conn // nil until the handshake is done; set under hub.mu
	batch  *batchConn      // conn's TCP connection, which the writer batches frames on

	// send is buffered to cfg.SendQueue messages; when it is full the
	// browser is not keeping up and is disconnected.
	send chan *websocket.PreparedMessage

	once     sync.Once
	quit     chan struct{} // closed by close: the writer says goodbye and leaves
	code     int           // close code for the goodbye, 0 for none; set before quit closes
	reason   string        // close reason for the goodbye; set before quit closes
	readDone chan struct{} // closed when the reader has returned
}

// close asks the writer to end the connection with code and reason; only
// the first call counts, and it reports whether it was the first. Code 0
// ends it without a close frame.
func (c *client) close(code int, reason string) (first bool) {
	c.once.Do(func() {
		c.code, c.reason = code, reason
		close(c.quit)
		first = true
	})
	return first
}

// readLoop moves browser messages onto the bus; it is the conn's only
// reader. A message it cannot accept ends the connection with a close code
// saying why; after that it only reads to see the browser's close frame.
func (c *client) readLoop() {
	h := c.hub
	defer func() {
		c.close(0, "") // the browser left or the connection broke
		close(c.readDone)
		h.wg.Done()
	}()
	c.conn.SetReadDeadline(time.Now().Add(h.cfg.PongWait))
	c.conn.SetPongHandler(func(string) error {
		return c.conn.SetReadDeadline(time.Now().Add(h.cfg.PongWait))
	})
	limit := newTokenBucket(h.cfg.Rate, h.cfg.Burst)
	refused := false
	for {
		kind, r, err := c.conn.NextReader()
		if err != nil {
			return
		}
		if refused {
			io.Copy(io.Discard, r)
			continue
		}
		msg, err := io.ReadAll(io.LimitReader(r, h.cfg.MaxMessage+1))
		if err != nil {
			return
		}
		code, reason := c.accept(kind, msg)
		if code == 0 && !limit.allow(time.Now()) {
			code, reason = websocket.ClosePolicyViolation, fmt.Sprintf("too many messages: limit is %g a second", h.cfg.Rate)
		}
		if code == 0 {
			code, reason = c.publish(msg)
		}
		if code != 0 {
			h.bus.Log("browser message refused", slog.LevelInfo, "remote", c.remote, "code", code, "reason", reason)
			c.close(code, reason)
			refused = true
		}
	}
}

// accept checks a browser message. It returns 0 if the message is
// acceptable, or the close code and reason that refuse it.
func (c *client) accept(kind int, msg []byte) (code int, reason string) {
	switch {
	case int64(len(msg)) > c.hub.cfg.MaxMessage:
		return websocket.CloseMessageTooBig, fmt.Sprintf("message too big: limit is %d bytes", c.hub.cfg.MaxMessage)
	case kind != websocket.TextMessage:
		return websocket.CloseUnsupportedData, "binary messages are not supported"
	case !utf8.Valid(msg):
		return websocket.CloseInvalidFramePayloadData, "text message is not valid UTF-8"
	}
	return 0, ""
}

// publish puts a browser message on the bus. It returns 0 on success, or
// the close code and reason that refuse it.
func (c *client) publish(msg []byte) (code int, reason string) {
	_, err := c.hub.bus.Publish(ChannelWS2AMQP, msg)
	switch {
	case err == nil:
		return 0, ""
	case errors.Is(err, ErrOutboxFull):
		return websocket.CloseTryAgainLater, "broker unavailable: try again later"
	case errors.Is(err, ErrStopped):
		return websocket.CloseGoingAway, "server shutting down"
	}
	return websocket.CloseInternalServerErr, "internal error"
}

// writeLoop pushes queued messages and pings to the browser; it is the
// conn's only writer. It owns the connection's end: when it returns, the
// TCP connection is closed and the browser unregistered.
func (c *client) writeLoop() {
	h := c.hub
	ping := time.NewTicker(h.cfg.pingPeriod())
	defer func() {
		ping.Stop()
		c.conn.Close()
		h.mu.Lock()
		delete(h.clients, c)
		h.mu.Unlock()
		h.wg.Done()
	}()
	for {
		// A browser being sent away gets its goodbye before anything
		// else that is queued.
		select {
		case <-c.quit:
			c.goodbye()
			return
		default:
		}
		select {
		case pm := <-c.send:
			if c.writeBatch(pm) != nil {
				return
			}
		case <-ping.C:
			if c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(h.cfg.WriteWait)) != nil {
				return
			}
		case <-c.quit:
			c.goodbye()
			return
		}
	}
}

// maxWriteBatch bounds how many queued messages go out in one write:
// enough to amortize the system call, few enough that a write is short.
const maxWriteBatch = 64

// writeBatch sends pm and what else is queued behind it, up to
// maxWriteBatch messages, in one write to the socket, within the write
// deadline.
func (c *client) writeBatch(pm *websocket.PreparedMessage) error {
	c.batch.hold()
	c.conn.SetWriteDeadline(time.Now().Add(c.hub.cfg.WriteWait))
	err := c.conn.WritePreparedMessage(pm)
	for n := 1; err == nil && n < maxWriteBatch && len(c.send) > 0; n++ {
		err = c.conn.WritePreparedMessage(<-c.send)
	}
	if ferr := c.batch.flush(); err == nil {
		err = ferr
	}
	return err
}

// goodbye ends the connection the way close asked: on shutdown it first
// delivers what is queued, then it sends the close frame and waits a little
// for the browser's answer.
func (c *client) goodbye() {
	if c.code == 0 {
		return
	}
	if c.code == websocket.CloseGoingAway {
		for len(c.send) > 0 {
			if c.writeBatch(<-c.send) != nil {
				return
			}
		}
	}
	frame := websocket.FormatCloseMessage(c.code, c.reason)
	if c.conn.WriteControl(websocket.CloseMessage, frame, time.Now().Add(c.hub.cfg.WriteWait)) != nil {
		return
	}
	t := time.NewTimer(closeWait)
	defer t.Stop()
	select {
	case <-c.readDone:
	case <-t.C:
	}
}

// tokenBucket limits how fast one browser may send: it holds up to burst
// tokens, gains rate tokens a second, and each message takes one. It is
// used by one reader goroutine only.
type tokenBucket struct {
	rate, burst, tokens float64
	last                time.Time
}

func newTokenBucket(rate float64, burst int) *tokenBucket {
	return &tokenBucket{rate: rate, burst: float64(burst), tokens: float64(burst), last: time.Now()}
}

// allow takes a token if there is one; a zero rate allows everything.
func (b *tokenBucket) allow(now time.Time) bool {
	if b.rate <= 0 {
		return true
	}
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// hijacker hands gorilla's Upgrade a batchConn in place of the browser's
// TCP connection.
type hijacker struct {
	http.ResponseWriter
	conn *batchConn // set by Hijack
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.conn = &batchConn{Conn: nc}
	return h.conn, brw, nil
}

// batchConn is a browser's TCP connection as gorilla sees it. While the
// writer holds it, the frames that gorilla writes collect in a buffer, and
// flush sends them in one system call; otherwise writes go straight
// through. Control frames that other goroutines write meanwhile (a pong
// from the reader) join the buffer in order.
type batchConn struct {
	net.Conn

	// mu guards holding and buf, and is held across writes to Conn so
	// that frames never interleave or overtake one another.
	mu      sync.Mutex
	holding bool
	buf     *[]byte // from batchBuffers while holding, nil otherwise
}

// batchBuffers recycles batch buffers, so that an idle browser holds none.
var batchBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.holding {
		return c.Conn.Write(p)
	}
	if c.buf == nil {
		c.buf = batchBuffers.Get().(*[]byte)
	}
	*c.buf = append(*c.buf, p...)
	return len(p), nil
}

// hold makes writes collect until flush.
func (c *batchConn) hold() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.holding = true
}

// flush sends what collected since hold in one write, and lets writes go
// straight through again.
func (c *batchConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.holding = false
	if c.buf == nil {
		return nil
	}
	_, err := c.Conn.Write(*c.buf)
	*c.buf = (*c.buf)[:0]
	batchBuffers.Put(c.buf)
	c.buf = nil
	return err
}
