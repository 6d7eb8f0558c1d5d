package main

// The WebSocket side of "Plugging AMQP and WebSockets": the post's Tornado
// WSHandler, whose on_message publishes browser messages on the bus
// (ws2amqp) and whose push_message writes bus messages (amqp2ws) to the
// browser.

import (
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
	History        int           // wsamqp.v1: lines of its room a browser gets on joining, unless it asks otherwise
	HistoryMax     int           // the most a browser may ask for, and the lines kept per room
	CacheBytes     int64         // bytes of lines kept for all rooms, for history and quick resumes
	ReplayBytes    int64         // bounds one replay from the stream

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

	// mu guards the fields below it.
	mu         sync.Mutex
	clients    map[*client]struct{}
	rooms      map[string][]*client // the browsers in each room; each knows its place (client.slot)
	perIP      map[string]int       // browsers connected from each IP address
	closing    bool                 // Close has begun; new browsers are turned away
	cache      *roomCache           // the latest lines of each room
	lastOffset int64                // the offset of the last message broadcast; -1 before any

	live     chan struct{} // closed once the AMQP plugin has caught up with the stream
	liveOnce sync.Once

	metrics *Metrics // set by newBridge before the bus starts; nil counts nothing

	wg sync.WaitGroup // one count per reader and per writer goroutine; added to under mu while !closing
}

// NewHub returns the WebSocket handler for b. Call Subscribe to plug it in.
func NewHub(b *Bus, cfg WSConfig) *Hub {
	h := &Hub{
		bus: b, cfg: cfg,
		clients: make(map[*client]struct{}), rooms: make(map[string][]*client), perIP: make(map[string]int),
		cache: newRoomCache(cfg.HistoryMax, cfg.CacheBytes), lastOffset: -1, live: make(chan struct{}),
	}
	h.upgrader = websocket.Upgrader{
		Subprotocols:    []string{ProtocolV1},
		ReadBufferSize:  1024,
		WriteBufferSize: 1024,
		// Idle browsers hold no write buffer: it is taken from the pool
		// for the length of one write.
		WriteBufferPool: &sync.Pool{},
		CheckOrigin:     h.checkOrigin,
	}
	return h
}

// Subscribe plugs the hub into the bus: every amqp2ws message goes to the
// browsers of its room, browsers wait for caughtup before they join, and
// they are sent away when the bus stops.
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
		return nil, h.broadcast(args[0].([]Message))
	})
	h.bus.Subscribe(ChannelCaughtUp, "ws", DefaultPriority, func(...any) (any, error) {
		h.liveOnce.Do(func() { close(h.live) })
		return nil, nil
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
	j, err := parseJoin(r, h.cfg)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	// Until the AMQP plugin has read the stream as far as it reached at
	// start, history is incomplete: browsers wait for it, a little.
	wait := time.NewTimer(h.cfg.WriteWait)
	select {
	case <-h.live:
		wait.Stop()
	case <-wait.C:
		http.Error(w, "catching up with the stream: try again", http.StatusServiceUnavailable)
		return
	case <-r.Context().Done():
		wait.Stop()
		return
	}

	// The browser joins the hub before the handshake answer goes out, so
	// that every message broadcast after its "open" event reaches it; what
	// arrives meanwhile waits in its queue for the writer. A wsamqp.v1
	// browser's history or replay is put first in that queue under the
	// same lock as its joining the room: nothing is missed or doubled at
	// the seam between the two.
	c := &client{
		hub:      h,
		remote:   r.RemoteAddr,
		ip:       remoteIP(r.RemoteAddr),
		room:     j.room,
		v1:       j.v1,
		journey:  j.v1 && j.journey,
		wake:     make(chan struct{}, 1),
		quit:     make(chan struct{}),
		readDone: make(chan struct{}),
	}
	var through int64 // with a replay from the stream: the last offset it must cover
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
		c.slot = len(h.rooms[c.room])
		h.rooms[c.room] = append(h.rooms[c.room], c)
		if c.v1 {
			lines, slow := h.joinLines(j)
			if slow {
				c.gated, through = true, h.lastOffset
			} else {
				c.queue = frameItems(lines, nil, true)
				c.wake <- struct{}{} // its history and ready event wait for the writer
				if j.since >= 0 || j.history > 0 {
					h.metrics.replay("cache", slices.Equal(lines[0], gapLine))
				}
			}
		}
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
		if c.gated {
			lines, err := h.replayLines(j, through)
			if err != nil {
				h.bus.Log("replay failed", slog.LevelWarn, "remote", c.remote, "room", c.room, "since", j.since, "err", err)
				h.metrics.browserCut("replay")
				c.close(websocket.CloseTryAgainLater, "history unavailable: try again later")
				return
			}
			h.metrics.replay("stream", slices.Equal(lines[0], gapLine))
			c.ungate(frameItems(lines, nil, true))
		}
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
	// The last browser of the room takes c's place.
	cs := h.rooms[c.room]
	last := cs[len(cs)-1]
	cs[c.slot], last.slot = last, c.slot
	cs[len(cs)-1] = nil
	if cs = cs[:len(cs)-1]; len(cs) == 0 {
		delete(h.rooms, c.room)
	} else {
		h.rooms[c.room] = cs
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

// client is a middleman between one browser's WebSocket and the hub.
type client struct {
	hub     *Hub
	remote  string          // the browser's address, for the log
	ip      string          // its IP address, for the per-address limit
	room    string          // the room it is in
	slot    int             // its place in hub.rooms[room]; guarded by hub.mu
	v1      bool            // it speaks wsamqp.v1: it is sent JSON lines, not raw messages
	journey bool            // its live lines carry their journey
	conn    *websocket.Conn // nil until the handshake is done; set under hub.mu
	raw     *lockedConn     // conn's TCP connection, on which the writer writes frames
	bufs    [][]byte        // the writer's: a write's frames, kept between writes

	// mu guards queue, lines, queued and gated: frames waiting for the
	// writer, shared with every other browser of the room, and how many
	// messages and bytes of them arrived live; while gated, a replay from
	// the stream is being read, to go first, and the writer waits.
	mu     sync.Mutex
	queue  []queued
	lines  int
	queued int64
	gated  bool
	wake   chan struct{} // capacity 1: one pending wake-up is enough for any number of frames

	once     sync.Once
	quit     chan struct{} // closed by close: the writer says goodbye and leaves
	code     int           // close code for the goodbye, 0 for none; set before quit closes
	reason   string        // close reason for the goodbye; set before quit closes
	readDone chan struct{} // closed when the reader has returned
}

// kind says what the browser is sent of a message.
func (c *client) kind() int {
	switch {
	case c.journey:
		return kindJourney
	case c.v1:
		return kindV1
	}
	return kindRaw
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
		why := closeReason(code)
		h.metrics.refusedMessage(why)
		h.metrics.browserCut(why)
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
		h.metrics.browserMessage()
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

// closeReason names a close code for the metrics' reason label.
func closeReason(code int) string {
	switch code {
	case websocket.CloseMessageTooBig:
		return "size"
	case websocket.CloseInvalidFramePayloadData:
		return "utf8"
	case websocket.CloseUnsupportedData:
		return "binary"
	case websocket.ClosePolicyViolation:
		return "rate"
	case websocket.CloseTryAgainLater:
		return "outbox_full"
	case websocket.CloseGoingAway:
		return "stopping"
	}
	return "internal"
}

// roomCounts returns the last offset broadcast and how many browsers are
// in each room, for /debug.
func (h *Hub) roomCounts() (int64, map[string]int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rooms := make(map[string]int, len(h.rooms))
	for name, cs := range h.rooms {
		rooms[name] = len(cs)
	}
	return h.lastOffset, rooms
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
	_, err := c.hub.bus.Publish(ChannelWS2AMQP, msg, c.room, (<-chan struct{})(c.quit))
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
	var batch []queued
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
			if batch = c.take(batch); c.write(batch) != nil {
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
func (c *client) goodbye(spare []queued) {
	if c.code == 0 {
		return
	}
	if c.code == websocket.CloseGoingAway {
		if c.write(c.take(spare)) != nil {
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
