package main

// Rooms, history and resume. The posts had one conversation, and a page
// that lost its connection lost what was said meanwhile. Here the room is
// a message's routing key, every message has an offset in one RabbitMQ
// stream that every bridge process reads, and a browser that speaks the
// wsamqp.v1 protocol can ask for the last lines of its room when it joins
// (?history=K) or for everything after the last offset it has when it
// comes back (?since=N), from whichever process it comes back to.
//
// The hub keeps the latest lines of each room in memory (roomCache), so a
// join or a short absence is served at once; a browser that was away
// longer gets its lines read from the stream by the AMQP plugin, asked on
// the bus channel "replay".

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"time"

	"github.com/gorilla/websocket"
)

// The bus channels of rooms and resume.
const (
	ChannelReplay   = "replay"   // args: req ReplayRequest; output: ReplayResult. The web side asks for what a browser missed; the AMQP plugin reads it from the stream
	ChannelCaughtUp = "caughtup" // no args: the AMQP plugin has read the stream as far as it reached when it started; what follows is live
)

// LobbyRoom is the room of a message sent with no routing key, and of a
// browser that names none.
const LobbyRoom = "lobby"

// ProtocolV1 is the WebSocket subprotocol of rooms, history and resume. A
// browser that does not offer it gets raw mode: one payload per frame, as
// in the posts.
const ProtocolV1 = "wsamqp.v1"

// roomName is what a room may be called.
var roomName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

// join is what a browser asks for in its handshake.
type join struct {
	room    string
	v1      bool
	since   int64 // resume after this offset; -1 for a fresh join
	history int   // on a fresh join, how many of the room's last lines
	journey bool  // live lines carry their journey ("t")
}

// parseJoin reads ?room, ?since, ?history and ?journey, and whether the
// browser speaks wsamqp.v1. since wins over history when both are given.
func parseJoin(r *http.Request, cfg WSConfig) (join, error) {
	q := r.URL.Query()
	j := join{room: LobbyRoom, since: -1, history: cfg.History}
	for _, p := range websocket.Subprotocols(r) {
		j.v1 = j.v1 || p == ProtocolV1
	}
	if room := q.Get("room"); room != "" {
		if !roomName.MatchString(room) {
			return j, fmt.Errorf("room %.70q: a room is 1 to 64 of a-z, 0-9, _ and -, starting with a letter or digit", room)
		}
		j.room = room
	}
	number := func(name string) (int64, error) {
		n, err := strconv.ParseInt(q.Get(name), 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%s %.30q: not a non-negative integer", name, q.Get(name))
		}
		return n, nil
	}
	if q.Has("since") {
		n, err := number("since")
		if err != nil {
			return j, err
		}
		j.since = n
	}
	if q.Has("history") {
		n, err := number("history")
		if err != nil {
			return j, err
		}
		j.history = int(min(n, int64(cfg.HistoryMax)))
	}
	if q.Has("journey") {
		b, err := strconv.ParseBool(q.Get("journey"))
		if err != nil {
			return j, fmt.Errorf("journey %.30q: not true or false", q.Get("journey"))
		}
		j.journey = b
	}
	return j, nil
}

// cachedLine is a message as the hub keeps it: its v1 line made once.
type cachedLine struct {
	offset int64
	line   []byte
}

// roomCache keeps the latest lines of every room, at most perRoom in a
// room and maxBytes in all, the oldest going first. It is guarded by
// Hub.mu.
type roomCache struct {
	perRoom  int
	maxBytes int64

	rooms   map[string]*roomLog
	order   []cacheEntry // every line kept, oldest first, and some a room evicted on its own (stale)
	lines   int          // lines kept
	bytes   int64        // their bytes
	covered int64        // the offset of the first line this process read; -1 before any
	evicted int64        // the highest offset evicted; -1 before any
}

// roomLog is the kept lines of one room, and from which offset on they are
// all there.
type roomLog struct {
	name     string
	lines    []cachedLine
	complete int64 // every line of the room with an offset at least this is kept
}

// cacheEntry places a line in the eviction order.
type cacheEntry struct {
	log    *roomLog
	offset int64
}

func newRoomCache(perRoom int, maxBytes int64) *roomCache {
	return &roomCache{perRoom: perRoom, maxBytes: maxBytes, rooms: make(map[string]*roomLog), covered: -1, evicted: -1}
}

// completeFrom returns the offset from which the cache holds every line
// of room.
func (rc *roomCache) completeFrom(room string) int64 {
	if log, ok := rc.rooms[room]; ok {
		return log.complete
	}
	return max(rc.covered, rc.evicted+1)
}

// add keeps a line, evicting the oldest lines past the limits. Its time
// is constant, amortized: a line is placed once, evicted once, and moved
// by a compaction at most once per line added.
func (rc *roomCache) add(room string, l cachedLine) {
	if rc.covered < 0 {
		rc.covered = l.offset
	}
	log, ok := rc.rooms[room]
	if !ok {
		log = &roomLog{name: room, complete: rc.completeFrom(room)}
		rc.rooms[room] = log
	}
	log.lines = append(log.lines, l)
	rc.order = append(rc.order, cacheEntry{log, l.offset})
	rc.lines++
	rc.bytes += int64(len(l.line))
	if len(log.lines) > rc.perRoom {
		rc.evict(log)
	}
	for rc.bytes > rc.maxBytes && len(rc.order) > 0 {
		e := rc.order[0]
		rc.order = rc.order[1:]
		if rc.rooms[e.log.name] == e.log && len(e.log.lines) > 0 && e.log.lines[0].offset == e.offset {
			rc.evict(e.log)
		}
	}
	if len(rc.order) > 2*rc.lines+64 {
		rc.compact()
	}
}

// evict drops the oldest line of log.
func (rc *roomCache) evict(log *roomLog) {
	l := log.lines[0]
	log.lines[0] = cachedLine{}
	log.lines = log.lines[1:]
	log.complete = l.offset + 1
	rc.lines--
	rc.bytes -= int64(len(l.line))
	rc.evicted = max(rc.evicted, l.offset)
	if len(log.lines) == 0 {
		delete(rc.rooms, log.name)
	}
}

// compact rebuilds the eviction order from the rooms, without the entries
// of lines that a room evicted on its own.
func (rc *roomCache) compact() {
	order := make([]cacheEntry, 0, rc.lines)
	for _, log := range rc.rooms {
		for _, l := range log.lines {
			order = append(order, cacheEntry{log, l.offset})
		}
	}
	slices.SortFunc(order, func(a, b cacheEntry) int { return cmp.Compare(a.offset, b.offset) })
	rc.order = order
}

// history returns the last k lines of room.
func (rc *roomCache) history(room string, k int) []cachedLine {
	log, ok := rc.rooms[room]
	if !ok || k <= 0 {
		return nil
	}
	return log.lines[max(0, len(log.lines)-k):]
}

// after returns the lines of room after offset, and whether the cache
// holds all of them.
func (rc *roomCache) after(room string, offset int64) ([]cachedLine, bool) {
	if rc.completeFrom(room) > offset+1 {
		return nil, false
	}
	log, ok := rc.rooms[room]
	if !ok {
		return nil, true
	}
	i := len(log.lines)
	for i > 0 && log.lines[i-1].offset > offset {
		i--
	}
	return log.lines[i:], true
}

// encodeLine makes a message's wsamqp.v1 line: {"offset":N,"data":...}
// when the payload is JSON (compacted onto one line), else
// {"offset":N,"text":"..."}; then, with journey, for a line from a
// browser, its journey through the bridges so far, in Unix milliseconds:
// "t":{"in": reached its bridge, "out": published, "back": read from the
// stream by this one}.
func encodeLine(msg Message, journey bool) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, `{"offset":%d,`, msg.Offset)
	if json.Valid(msg.Body) {
		b.WriteString(`"data":`)
		json.Compact(&b, msg.Body)
	} else {
		text, _ := json.Marshal(string(msg.Body))
		b.WriteString(`"text":`)
		b.Write(text)
	}
	if journey && msg.Sent > 0 && msg.Published > 0 && msg.Consumed > 0 {
		ms := func(ns int64) float64 { return float64(ns) / 1e6 }
		fmt.Fprintf(&b, `,"t":{"in":%.3f,"out":%.3f,"back":%.3f}`, ms(msg.Sent), ms(msg.Published), ms(msg.Consumed))
	}
	b.WriteByte('}')
	return b.Bytes()
}

// readyLine is the event that ends a join's history or replay.
func readyLine(room string, offset int64) []byte {
	return fmt.Appendf(nil, `{"event":"ready","room":%q,"offset":%d}`, room, offset)
}

// gapLine says that some messages after since may be missing.
var gapLine = []byte(`{"event":"gap"}`)

// joinLines computes what a wsamqp.v1 browser is sent before live lines,
// from the cache. It reports slow when the cache does not go back far
// enough and the stream must be read. h.mu is held.
func (h *Hub) joinLines(j join) (lines [][]byte, slow bool) {
	if j.since < 0 {
		ready := int64(-1)
		for _, l := range h.cache.history(j.room, j.history) {
			lines = append(lines, l.line)
			ready = l.offset
		}
		return append(lines, readyLine(j.room, ready)), false
	}
	if j.since > h.lastOffset {
		// An offset this stream never reached: the stream was made anew,
		// or the browser is confused. Either way, say so.
		return [][]byte{gapLine, readyLine(j.room, j.since)}, false
	}
	cached, ok := h.cache.after(j.room, j.since)
	if !ok {
		return nil, true
	}
	ready := j.since
	for _, l := range cached {
		lines = append(lines, l.line)
		ready = l.offset
	}
	return append(lines, readyLine(j.room, ready)), false
}

// replayLines reads from the stream, through the AMQP plugin, what a
// resuming browser missed that the cache no longer holds: the lines of its
// room after j.since, up to through, the last offset it gets live.
func (h *Hub) replayLines(j join, through int64) ([][]byte, error) {
	out, err := h.bus.Publish(ChannelReplay, ReplayRequest{
		Room: j.room, After: j.since, Through: through,
		Before: time.Now().Add(h.cfg.WriteWait), MaxBytes: h.cfg.ReplayBytes,
	})
	if err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errors.New("ws: nobody answered the replay")
	}
	res := out[0].(ReplayResult)
	var lines [][]byte
	if res.Gap {
		lines = append(lines, gapLine)
	}
	ready := j.since
	for _, m := range res.Messages {
		lines = append(lines, encodeLine(m, false))
		ready = m.Offset
	}
	return append(lines, readyLine(j.room, ready)), nil
}
