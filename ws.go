package main

// The WebSocket side of "Plugging AMQP and WebSockets": the post's Tornado
// WSHandler, whose on_message publishes browser messages on the bus
// (ws2amqp) and whose push_message writes bus messages (amqp2ws) to the
// browser.

import (
	"bufio"
	"encoding/binary"
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
	MaxMessage     int64         // largest message, in bytes, from a browser or for browsers
	SendQueue      int           // messages queued for one browser before it is too slow
	SendQueueBytes int64         // bytes queued for one browser before it is too slow
	MaxConns       int           // browsers connected at once
	MaxConnsPerIP  int           // browsers connected at once from one IP address
	Rate           float64       // messages (pings included) a second one browser may send on average; 0 for no limit
	Burst          int           // messages one browser may send at once, above Rate
	WriteWait      time.Duration // bounds one write to a browser
	PongWait       time.Duration // how long a browser may stay silent, pongs included; at least 2 × WriteWait
	Origins        []string      // origins allowed besides the page's own ("https://example.com")

	CloseTimeout time.Duration // bounds how long browsers get to leave on shutdown
}

// pingPeriod is how often browsers are pinged. A ping may wait behind a
// write that takes up to WriteWait, and a live browser's pong must still
// arrive before its read deadline, PongWait after the last: so a ping goes
// out a little before PongWait - WriteWait.
func (cfg WSConfig) pingPeriod() time.Duration { return (cfg.PongWait - cfg.WriteWait) * 9 / 10 }

// closeWait bounds how long a closing connection waits for the browser's
// answering close frame before it drops the TCP connection.
const closeWait = 2 * time.Second

// Hub is the WebSocket handler: it upgrades browsers at /ws, moves their
// messages onto the bus, and fans every amqp2ws message out to all of them.
type Hub struct {
	bus      *Bus
	cfg      WSConfig
	upgrader websocket.Upgrader

	// mu guards clients, perIP and closing.
	mu      sync.Mutex
	clients map[*client]struct{}
	perIP   map[string]int // browsers connected from each IP address
	closing bool           // Close has begun; new browsers are turned away

	wg sync.WaitGroup // one count per reader and per writer goroutine; added to under mu while !closing
}

// NewHub returns the WebSocket handler for b. Call Subscribe to plug it in.
func NewHub(b *Bus, cfg WSConfig) *Hub {
	h := &Hub{bus: b, cfg: cfg, clients: make(map[*client]struct{}), perIP: make(map[string]int)}
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
		ip:       remoteIP(r.RemoteAddr),
		wake:     make(chan struct{}, 1),
		quit:     make(chan struct{}),
		readDone: make(chan struct{}),
	}
	h.mu.Lock()
	refuse, status := "", http.StatusServiceUnavailable
	switch {
	case h.closing:
		refuse = "server shutting down"
	case len(h.clients) >= h.cfg.MaxConns:
		refuse = fmt.Sprintf("too many connections (limit %d)", h.cfg.MaxConns)
	case h.perIP[c.ip] >= h.cfg.MaxConnsPerIP:
		refuse, status = fmt.Sprintf("too many connections from your address (limit %d)", h.cfg.MaxConnsPerIP), http.StatusTooManyRequests
	default:
		h.clients[c] = struct{}{}
		h.perIP[c.ip]++
	}
	h.mu.Unlock()
	if refuse != "" {
		http.Error(w, refuse, status)
		return
	}

	hj := &hijacker{ResponseWriter: w}
	conn, err := h.upgrader.Upgrade(hj, r, nil) // on failure it has answered 400 or 403
	h.mu.Lock()
	closing := h.closing
	if err != nil || closing {
		h.remove(c)
	} else {
		c.conn, c.raw = conn, hj.conn
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

// remove takes c out of the hub. h.mu is held.
func (h *Hub) remove(c *client) {
	if _, ok := h.clients[c]; !ok {
		return
	}
	delete(h.clients, c)
	if h.perIP[c.ip]--; h.perIP[c.ip] <= 0 {
		delete(h.perIP, c.ip)
	}
}

// remoteIP returns the IP address of a request's remote address.
func remoteIP(remote string) string {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		return remote
	}
	return host
}

// broadcast frames body once and queues the same bytes for every browser.
// A browser whose queue is full, in messages or in bytes, is too slow: it
// is disconnected, never waited for. It runs on the AMQP plugin's
// consuming goroutine.
func (h *Hub) broadcast(body []byte) error {
	if int64(len(body)) > h.cfg.MaxMessage {
		return fmt.Errorf("ws: broker message of %d bytes dropped: larger than -max-message (%d)", len(body), h.cfg.MaxMessage)
	}
	if !utf8.Valid(body) {
		return errors.New("ws: broker message dropped: not valid UTF-8; browsers only take text")
	}
	frame := textFrame(body)
	var slow []*client
	h.mu.Lock()
	for c := range h.clients {
		if !c.enqueue(frame) && c.close(websocket.ClosePolicyViolation, "too slow: send queue full") {
			slow = append(slow, c)
		}
	}
	h.mu.Unlock()
	for _, c := range slow {
		h.bus.Log("browser cut off as too slow", slog.LevelWarn, "remote", c.remote, "queue", h.cfg.SendQueue, "queue_bytes", h.cfg.SendQueueBytes)
	}
	return nil
}

// textFrame returns body as a complete WebSocket text frame, as a server
// sends it: unmasked, so the same bytes serve every browser.
func textFrame(body []byte) []byte {
	var head [10]byte
	head[0] = 0x80 | websocket.TextMessage // FIN, opcode
	n := 2
	switch l := len(body); {
	case l < 126:
		head[1] = byte(l)
	case l <= 0xFFFF:
		head[1] = 126
		binary.BigEndian.PutUint16(head[2:], uint16(l))
		n = 4
	default:
		head[1] = 127
		binary.BigEndian.PutUint64(head[2:], uint64(l))
		n = 10
	}
	frame := make([]byte, n+len(body))
	copy(frame, head[:n])
	copy(frame[n:], body)
	return frame
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
			if c.raw != nil {
				c.raw.Close()
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
	ip     string          // its IP address, for the per-address limit
	conn   *websocket.Conn // nil until the handshake is done; set under hub.mu
	raw    *lockedConn     // conn's TCP connection, on which the writer writes frames

	// mu guards queue and queued: frames waiting for the writer, shared
	// with every other browser, and their bytes.
	mu     sync.Mutex
	queue  [][]byte
	queued int64
	wake   chan struct{} // capacity 1: one pending wake-up is enough for any number of frames

	once     sync.Once
	quit     chan struct{} // closed by close: the writer says goodbye and leaves
	code     int           // close code for the goodbye, 0 for none; set before quit closes
	reason   string        // close reason for the goodbye; set before quit closes
	readDone chan struct{} // closed when the reader has returned
}

// enqueue queues a frame for the writer. It reports false, queueing
// nothing, when the browser already has SendQueue frames or SendQueueBytes
// bytes waiting: it is not keeping up.
func (c *client) enqueue(frame []byte) bool {
	c.mu.Lock()
	full := len(c.queue) >= c.hub.cfg.SendQueue || c.queued+int64(len(frame)) > c.hub.cfg.SendQueueBytes
	if !full {
		c.queue = append(c.queue, frame)
		c.queued += int64(len(frame))
	}
	c.mu.Unlock()
	if !full {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return !full
}

// take returns what is queued and empties the queue, handing back the
// previous batch's slice (emptied) to be filled next, so that a busy
// browser allocates nothing per batch and an idle one holds little.
func (c *client) take(spare [][]byte) [][]byte {
	clear(spare)
	if cap(spare) > maxSpareBatch {
		spare = nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	batch := c.queue
	c.queue, c.queued = spare[:0], 0
	return batch
}

// maxSpareBatch bounds the frames slice a browser keeps between batches:
// a burst's larger slice is let go.
const maxSpareBatch = 256

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
// Any frame from the browser shows it is alive and extends its deadline;
// pings count against its rate limit, since each costs a pong.
func (c *client) readLoop() {
	h := c.hub
	defer func() {
		c.close(0, "") // the browser left or the connection broke
		close(c.readDone)
		h.wg.Done()
	}()
	alive := func() { c.conn.SetReadDeadline(time.Now().Add(h.cfg.PongWait)) }
	alive()
	limit := newTokenBucket(h.cfg.Rate, h.cfg.Burst)
	refused := false
	refuse := func(code int, reason string) {
		h.bus.Log("browser message refused", slog.LevelInfo, "remote", c.remote, "code", code, "reason", reason)
		c.close(code, reason)
		refused = true
	}
	tooMany := fmt.Sprintf("too many messages: limit is %g a second", h.cfg.Rate)
	c.conn.SetPongHandler(func(string) error { alive(); return nil })
	c.conn.SetPingHandler(func(data string) error {
		alive()
		if refused {
			return nil
		}
		if !limit.allow(time.Now()) {
			refuse(websocket.ClosePolicyViolation, tooMany)
			return nil
		}
		err := c.conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(h.cfg.WriteWait))
		if errors.Is(err, websocket.ErrCloseSent) {
			return nil
		}
		return err
	})
	for {
		kind, r, err := c.conn.NextReader()
		if err != nil {
			return
		}
		alive()
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
			code, reason = websocket.ClosePolicyViolation, tooMany
		}
		if code == 0 {
			code, reason = c.publish(msg)
		}
		if code != 0 {
			refuse(code, reason)
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
// the close code and reason that refuse it. The AMQP plugin may make it
// wait while its outbox is full and the broker is up; c.quit ends the
// wait.
func (c *client) publish(msg []byte) (code int, reason string) {
	_, err := c.hub.bus.Publish(ChannelWS2AMQP, msg, (<-chan struct{})(c.quit))
	switch {
	case err == nil:
		return 0, ""
	case errors.Is(err, ErrOutboxFull):
		return websocket.CloseTryAgainLater, "broker unavailable: try again later"
	case errors.Is(err, ErrStopped), errors.Is(err, ErrGaveUp):
		return websocket.CloseGoingAway, "server shutting down"
	}
	return websocket.CloseInternalServerErr, "internal error"
}

// writeLoop pushes queued frames and pings to the browser; it is the
// conn's only writer of data frames. It owns the connection's end: when it
// returns, the TCP connection is closed and the browser unregistered.
func (c *client) writeLoop() {
	h := c.hub
	ping := time.NewTicker(h.cfg.pingPeriod())
	var batch [][]byte
	defer func() {
		ping.Stop()
		c.conn.Close()
		h.mu.Lock()
		h.remove(c)
		h.mu.Unlock()
		h.wg.Done()
	}()
	for {
		// A browser being sent away gets its goodbye before anything
		// else that is queued.
		select {
		case <-c.quit:
			c.goodbye(batch)
			return
		default:
		}
		select {
		case <-c.wake:
			if batch = c.take(batch); c.raw.writeFrames(batch, h.cfg.WriteWait) != nil {
				return
			}
		case <-ping.C:
			if c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(h.cfg.WriteWait)) != nil {
				return
			}
		case <-c.quit:
			c.goodbye(batch)
			return
		}
	}
}

// goodbye ends the connection the way close asked: on shutdown it first
// delivers what is queued, then it sends the close frame and waits a little
// for the browser's answer.
func (c *client) goodbye(spare [][]byte) {
	if c.code == 0 {
		return
	}
	if c.code == websocket.CloseGoingAway {
		if c.raw.writeFrames(c.take(spare), c.hub.cfg.WriteWait) != nil {
			return
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

// hijacker hands gorilla's Upgrade a lockedConn in place of the browser's
// TCP connection.
type hijacker struct {
	http.ResponseWriter
	conn *lockedConn // set by Hijack
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.conn = &lockedConn{Conn: nc}
	return h.conn, brw, nil
}

// lockedConn is a browser's TCP connection, shared by the writer, which
// writes data frames on it directly (the same bytes for every browser,
// many in one system call), and gorilla, which writes control frames on
// it from the reader (pongs) and the writer (pings, close). Its mutex keeps
// frames whole and in order, and keeps a control frame's write deadline
// from changing the writer's in the middle of a write.
type lockedConn struct {
	net.Conn

	mu sync.Mutex // held across each write and each change of the write deadline
}

func (c *lockedConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *lockedConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.SetWriteDeadline(t)
}

func (c *lockedConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.SetDeadline(t)
}

// writeFrames writes whole frames in as few system calls as the kernel
// allows (writev), within wait.
func (c *lockedConn) writeFrames(frames [][]byte, wait time.Duration) error {
	if len(frames) == 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.Conn.SetWriteDeadline(time.Now().Add(wait))
	bufs := net.Buffers(frames) // WriteTo advances its own copy of the slice header
	_, err := bufs.WriteTo(c.Conn)
	return err
}
