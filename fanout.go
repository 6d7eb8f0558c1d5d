package main

// Fan-out: how the messages read from the stream reach every browser of
// their room, at the least cost per browser. The post's handler wrote each
// message to each browser as it came; at hundreds of thousands of
// deliveries a second, what a delivery costs is what the bridge costs.
// Three rules keep it small:
//
//   - One batch. The AMQP plugin hands the hub every delivery already
//     waiting, in one publish on the bus (amqp2ws carries a []Message),
//     so that the work per browser is done once per batch, not once per
//     message.
//   - One frame. The messages of a room in a batch are framed once per
//     kind of browser (one frame holding all their wsamqp.v1 lines, with
//     or without their journeys; one frame a message in raw mode, laid
//     end to end), and the same bytes are
//     queued for every browser of the room: server frames are not masked,
//     so a frame is plain bytes, for anyone.
//   - One wake-up. Queueing a batch for a browser takes its lock once and
//     wakes its writer once; the writer then writes all that is queued in
//     one system call (writev), however many batches that is.
//
// The hub's lock is held to update the cache and take the list of who is
// in each room, never across the fan-out itself: a browser that joins
// after the list was taken finds the batch in the cache's history, one
// that joined before gets it live, and none gets it twice.

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
)

// queued is what waits for a browser's writer: whole frames, the same
// bytes for every browser of a room, holding n messages, with when each
// of them reached a bridge (Unix nanoseconds), for the latency metric. The
// bridge's own lines (history, events) have no sent: they are not timed.
type queued struct {
	b    []byte
	n    int
	sent []int64
}

// Bounds on what is framed together: up to this many messages and bytes
// go in one wsamqp.v1 frame, or in one run of raw frames (a longer
// message goes alone).
const (
	maxFrameLines = 256
	maxFrameBytes = 64 << 10
)

// frameItems frames parts for browsers, in as few items as the bounds
// allow: in wsamqp.v1 (v1), the parts are lines, and each item is one
// frame holding them separated by newlines; in raw mode, each part is a
// frame of its own, laid end to end. sent, if not nil, says when each
// part's message reached a bridge.
func frameItems(parts [][]byte, sent []int64, v1 bool) []queued {
	var items []queued
	for len(parts) > 0 {
		n, size := 1, len(parts[0])
		for n < len(parts) && n < maxFrameLines && size+1+len(parts[n]) <= maxFrameBytes {
			size += 1 + len(parts[n])
			n++
		}
		var b []byte
		if v1 {
			b = appendTextHeader(make([]byte, 0, 10+size), size)
			for i, p := range parts[:n] {
				if i > 0 {
					b = append(b, '\n')
				}
				b = append(b, p...)
			}
		} else {
			b = make([]byte, 0, 10*n+size)
			for _, p := range parts[:n] {
				b = append(appendTextHeader(b, len(p)), p...)
			}
		}
		item := queued{b: b, n: n}
		if sent != nil {
			item.sent, sent = sent[:n:n], sent[n:]
		}
		items = append(items, item)
		parts = parts[n:]
	}
	return items
}

// roomBatch is the messages of one room in a batch, as they are queued
// for its browsers: framed on first need, once for each kind of browser.
type roomBatch struct {
	room    string
	msgs    []Message
	lines   [][]byte  // their wsamqp.v1 lines, as the cache keeps them
	sent    []int64   // when each reached a bridge, shared by every framing
	members []*client // who was in the room when the batch was cached

	framed [kinds]*framedBatch
}

// The kinds of browser, by what they are sent of a message: raw mode's
// payload, a wsamqp.v1 line, or a line with its journey.
const (
	kindRaw = iota
	kindV1
	kindJourney
	kinds
)

// framedBatch is a room's batch framed for one kind of browser, with its
// size.
type framedBatch struct {
	items []queued
	n     int
	bytes int64
}

func (rb *roomBatch) frames(kind int) *framedBatch {
	if f := rb.framed[kind]; f != nil {
		return f
	}
	parts := make([][]byte, len(rb.msgs))
	for i, msg := range rb.msgs {
		switch kind {
		case kindRaw:
			parts[i] = msg.Body
		case kindV1:
			parts[i] = rb.lines[i]
		case kindJourney:
			parts[i] = encodeLine(msg, true)
		}
	}
	f := &framedBatch{items: frameItems(parts, rb.sent, kind != kindRaw), n: len(parts)}
	for _, it := range f.items {
		f.bytes += int64(len(it.b))
	}
	rb.framed[kind] = f
	return f
}

// broadcast hands messages from the stream, in offset order, to the
// browsers of their rooms, keeping each line for history. A browser whose
// queue is full, in messages or in bytes, is too slow: it is disconnected,
// never waited for. A message that browsers cannot take is dropped and
// counted. It runs on the AMQP plugin's consuming goroutine; msgs is not
// kept.
func (h *Hub) broadcast(msgs []Message) error {
	var errs []error
	lines := make([][]byte, len(msgs)) // nil for a message dropped
	rooms := make(map[string]*roomBatch)
	var batches []*roomBatch // in order of first message, for a fair start
	for i, msg := range msgs {
		if err := h.refuse(msg); err != nil {
			errs = append(errs, err)
			continue
		}
		lines[i] = encodeLine(msg, false)
		rb := rooms[msg.Room]
		if rb == nil {
			rb = &roomBatch{room: msg.Room}
			rooms[msg.Room] = rb
			batches = append(batches, rb)
		}
		rb.msgs = append(rb.msgs, msg)
		rb.lines = append(rb.lines, lines[i])
		rb.sent = append(rb.sent, msg.Sent)
	}
	h.metrics.deliveries(len(msgs) - len(errs))

	h.mu.Lock()
	var resets [][2]int64
	for i, msg := range msgs {
		if msg.Offset <= h.lastOffset {
			// Offsets only go forward in one stream: this one was made
			// anew, and what the cache holds belongs to the old one.
			h.cache = newRoomCache(h.cfg.HistoryMax, h.cfg.CacheBytes)
			resets = append(resets, [2]int64{h.lastOffset, msg.Offset})
		}
		h.lastOffset = msg.Offset
		if lines[i] != nil {
			h.cache.add(msg.Room, cachedLine{offset: msg.Offset, line: lines[i]})
		}
	}
	for _, rb := range batches {
		rb.members = append([]*client(nil), h.rooms[rb.room]...)
	}
	h.mu.Unlock()

	for _, r := range resets {
		h.bus.Log("stream offsets went back: the stream was made anew; history restarts", slog.LevelWarn, "from", r[0], "to", r[1])
	}
	for _, rb := range batches {
		for _, c := range rb.members {
			if !c.enqueue(rb.frames(c.kind())) && c.close(websocket.ClosePolicyViolation, "too slow: send queue full") {
				h.metrics.browserCut("slow")
				h.bus.Log("browser cut off as too slow", slog.LevelWarn, "remote", c.remote, "queue", h.cfg.SendQueue, "queue_bytes", h.cfg.SendQueueBytes)
			}
		}
	}
	return errors.Join(errs...)
}

// refuse says why browsers cannot take a message from the stream, and
// counts it, or returns nil.
func (h *Hub) refuse(msg Message) error {
	switch {
	case int64(len(msg.Body)) > h.cfg.MaxMessage:
		h.metrics.droppedMessage("size")
		return fmt.Errorf("ws: broker message of %d bytes dropped: larger than -max-message (%d)", len(msg.Body), h.cfg.MaxMessage)
	case !utf8.Valid(msg.Body):
		h.metrics.droppedMessage("utf8")
		return errors.New("ws: broker message dropped: not valid UTF-8; browsers only take text")
	}
	return nil
}

// enqueue queues a room's batch for the writer, and wakes it. It reports
// false, queueing nothing, when the browser would then have more than
// SendQueue messages or SendQueueBytes bytes waiting: it is not keeping
// up. A browser with nothing waiting takes any batch: it is keeping up,
// and a batch is bounded (maxBusBatch) and shared.
func (c *client) enqueue(f *framedBatch) bool {
	c.mu.Lock()
	full := c.lines > 0 && (c.lines+f.n > c.hub.cfg.SendQueue || c.queued+f.bytes > c.hub.cfg.SendQueueBytes)
	if !full {
		c.queue = append(c.queue, f.items...)
		c.lines += f.n
		c.queued += f.bytes
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
func (c *client) take(spare []queued) []queued {
	clear(spare)
	if cap(spare) > maxSpareBatch {
		spare = nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gated {
		return spare[:0]
	}
	batch := c.queue
	c.queue, c.lines, c.queued = spare[:0], 0, 0
	return batch
}

// ungate puts a replay's frames before what arrived live meanwhile, and
// lets the writer go.
func (c *client) ungate(items []queued) {
	c.mu.Lock()
	c.queue = append(items, c.queue...)
	c.gated = false
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// write sends what was taken from the queue, in one system call where the
// kernel allows (writev).
func (c *client) write(batch []queued) error {
	if len(batch) == 0 {
		return nil
	}
	bufs := c.bufs[:0]
	for _, it := range batch {
		bufs = append(bufs, it.b)
	}
	err := c.raw.writeFrames(bufs, c.hub.cfg.WriteWait)
	clear(bufs)
	if cap(bufs) > maxSpareBatch {
		bufs = nil
	}
	c.bufs = bufs
	if err != nil {
		return err
	}
	c.hub.metrics.wrote(batch, time.Now())
	return nil
}

// maxSpareBatch bounds the slices a browser keeps between writes: a
// burst's larger ones are let go.
const maxSpareBatch = 256
