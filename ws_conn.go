package main

// A browser's connection, below the hub: its rate limit, the TCP
// connection the writer shares with gorilla, and frames made once.

import (
	"bufio"
	"encoding/binary"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

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

// appendTextHeader appends the header of an unmasked, final text frame
// whose payload is size bytes.
func appendTextHeader(dst []byte, size int) []byte {
	const first = 0x80 | websocket.TextMessage // FIN, opcode
	switch {
	case size < 126:
		return append(dst, first, byte(size))
	case size <= 0xFFFF:
		return binary.BigEndian.AppendUint16(append(dst, first, 126), uint16(size))
	}
	return binary.BigEndian.AppendUint64(append(dst, first, 127), uint64(size))
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
