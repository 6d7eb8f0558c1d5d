package main

// Logging that an attacker cannot flood. The posts logged through the
// bus's "log" channel, as wsamqp does; but a line per bad message means
// that anyone who can send bad messages (to a browser socket or to the
// exchange) can fill the disk and drown what matters. So repeated lines
// are rate limited, per message, and the count of those suppressed is
// reported with the next one let through.

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Bounds on repeated log lines.
const (
	// logBurst lines with the same message may be written at once...
	logBurst = 10
	// ...and then one every logEvery, the others counted and dropped.
	logEvery = time.Second
	// logKeys bounds how many different messages are tracked; past it the
	// oldest are forgotten, so that varied messages cannot grow the map.
	logKeys = 1024
)

// limitedHandler is a slog.Handler that lets through at most logBurst
// records with the same level and message at once, then one per logEvery.
type limitedHandler struct {
	next  slog.Handler
	state *logLimits // shared by the handlers WithAttrs and WithGroup derive
}

// logLimits is the per-message state of a limitedHandler.
type logLimits struct {
	mu   sync.Mutex // guards seen
	seen map[logKey]*logBucket
}

type logKey struct {
	level slog.Level
	msg   string
}

// logBucket is a token bucket of lines for one message.
type logBucket struct {
	tokens     float64
	last       time.Time
	suppressed int
}

// newLimitedHandler wraps next.
func newLimitedHandler(next slog.Handler) *limitedHandler {
	return &limitedHandler{next: next, state: &logLimits{seen: make(map[logKey]*logBucket)}}
}

func (h *limitedHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.next.Enabled(ctx, level)
}

// Handle writes r unless its message has been written too often lately;
// the first record let through after others were dropped says how many.
func (h *limitedHandler) Handle(ctx context.Context, r slog.Record) error {
	allowed, suppressed := h.state.allow(logKey{r.Level, r.Message}, r.Time)
	if !allowed {
		return nil
	}
	if suppressed > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Int("suppressed", suppressed))
	}
	return h.next.Handle(ctx, r)
}

func (h *limitedHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &limitedHandler{next: h.next.WithAttrs(attrs), state: h.state}
}

func (h *limitedHandler) WithGroup(name string) slog.Handler {
	return &limitedHandler{next: h.next.WithGroup(name), state: h.state}
}

// allow takes a line from key's bucket, and says how many lines were
// dropped since the last one let through.
func (l *logLimits) allow(key logKey, now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.seen[key]
	if !ok {
		if len(l.seen) >= logKeys {
			clear(l.seen) // rare; forgetting only lets a few more lines through
		}
		b = &logBucket{tokens: logBurst, last: now}
		l.seen[key] = b
	}
	b.tokens = min(logBurst, b.tokens+now.Sub(b.last).Seconds()/logEvery.Seconds())
	b.last = now
	if b.tokens < 1 {
		b.suppressed++
		return false, 0
	}
	b.tokens--
	suppressed := b.suppressed
	b.suppressed = 0
	return true, suppressed
}
