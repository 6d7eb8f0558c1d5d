package main

// Stream queues in the embedded broker, as RabbitMQ (3.9 and later) serves
// them over AMQP 0-9-1. The posts' queue handed each message to one
// consumer and forgot it; a stream is an append-only log that keeps its
// messages, each at an offset, and that any number of consumers read from
// any position: the first message kept, the last, the next to come, an
// offset, or a point in time. It is what lets a browser that comes back
// ask for what it missed.
//
// Declared with x-queue-type "stream": durable, never exclusive or
// auto-delete. Retention drops the oldest messages past x-max-length-bytes
// (or the broker's per-queue limits) and older than x-max-age. A consumer
// needs a prefetch, acknowledges manually, and its acknowledgements only
// give back credit: nothing leaves the log but by retention. Each delivery
// carries its offset in the x-stream-offset header. What RabbitMQ refuses
// on a stream (basic.get, queue.purge, automatic acknowledgement, x-max-
// length, dead-lettering) is refused with RabbitMQ's error.

import (
	"fmt"
	"strconv"
	"time"
)

// streamArguments are the queue arguments a stream takes; RabbitMQ refuses
// any other x- argument on a stream with 406.
var streamArguments = map[string]bool{
	"x-queue-type": true, "x-max-length-bytes": true, "x-max-age": true,
	"x-stream-max-segment-size-bytes": true, "x-initial-cluster-size": true, "x-queue-leader-locator": true,
}

// streamLog is the log of a stream queue.
type streamLog struct {
	base    uint64        // the offset of entries[0]
	entries []streamEntry // oldest first
	maxAge  time.Duration // x-max-age; 0 keeps messages whatever their age
}

// streamEntry is one message in a stream, with its delivery properties
// made once: the publisher's, plus the x-stream-offset header.
type streamEntry struct {
	msg *message
	at  time.Time
}

// end returns the offset the next message will get.
func (l *streamLog) end() uint64 { return l.base + uint64(len(l.entries)) }

// newStream makes q a stream, checking its declaration as RabbitMQ does.
func newStream(q *queue, durable, exclusive, autoDelete bool, args Table, m method) *amqpError {
	property := func(p string) *amqpError {
		return channelError(replyPreconditionFailed, m, "invalid property '%s' for queue '%s' in vhost '/'", p, q.name)
	}
	switch {
	case !durable:
		return property("non-durable")
	case exclusive:
		return property("exclusive-owner")
	case autoDelete:
		return property("auto-delete")
	}
	for arg := range args {
		if len(arg) > 2 && arg[:2] == "x-" && !streamArguments[arg] {
			return channelError(replyPreconditionFailed, m, "invalid arg '%s' for queue '%s' in vhost '/' of queue type rabbit_stream_queue", arg, q.name)
		}
	}
	q.stream = &streamLog{}
	if v, ok := args["x-max-length-bytes"]; ok {
		n, ok := asInt(v)
		if !ok || n < 0 {
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-max-length-bytes' for queue '%s' in vhost '/': %v", q.name, v)
		}
		q.maxBytes = min(q.maxBytes, int64(n))
	}
	if v, ok := args["x-max-age"]; ok {
		s, _ := v.(string)
		age, err := parseStreamAge(s)
		if err != nil {
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-max-age' for queue '%s' in vhost '/': %v", q.name, err)
		}
		q.stream.maxAge = age
	}
	q.args = Table{}
	for arg, v := range args {
		if streamArguments[arg] {
			q.args[arg] = v
		}
	}
	return nil
}

// parseStreamAge reads RabbitMQ's ages and intervals: a number and a unit,
// Y, M, D, h, m or s ("7D", "1h").
func parseStreamAge(s string) (time.Duration, error) {
	if len(s) < 2 {
		return 0, fmt.Errorf("%q is not an age such as 7D or 1h", s)
	}
	n, err := strconv.ParseUint(s[:len(s)-1], 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not an age such as 7D or 1h", s)
	}
	unit := map[byte]time.Duration{'Y': 365 * 24 * time.Hour, 'M': 30 * 24 * time.Hour, 'D': 24 * time.Hour, 'h': time.Hour, 'm': time.Minute, 's': time.Second}[s[len(s)-1]]
	if unit == 0 {
		return 0, fmt.Errorf("%q has no unit Y, M, D, h, m or s", s)
	}
	return time.Duration(n) * unit, nil
}

// appendStream adds msg to the stream q at the next offset, with the
// offset in its headers, and applies retention.
func (b *Broker) appendStream(q *queue, msg *message, now time.Time) {
	l := q.stream
	props, err := decodeProperties(msg.props)
	if err == nil {
		headers := Table{}
		for k, v := range props.headers {
			headers[k] = v
		}
		headers["x-stream-offset"] = int64(l.end())
		props.headers = headers
		stored := *msg
		stored.props = props.encode()
		msg = &stored
	}
	l.entries = append(l.entries, streamEntry{msg: msg, at: now})
	q.bytes += msg.size()
	b.held += msg.size()
	b.retain(q, now)
}

// retain drops the oldest messages of a stream past its length, bytes or
// age. A consumer that was reading them goes on from the oldest kept.
func (b *Broker) retain(q *queue, now time.Time) {
	l := q.stream
	drop := 0
	bytes := q.bytes
	for drop < len(l.entries) {
		e := l.entries[drop]
		old := l.maxAge > 0 && now.Sub(e.at) > l.maxAge
		if !old && len(l.entries)-drop <= q.maxLength && bytes <= q.maxBytes {
			break
		}
		bytes -= e.msg.size()
		drop++
	}
	if drop == 0 {
		return
	}
	clear(l.entries[:drop])
	l.entries = l.entries[drop:]
	l.base += uint64(drop)
	b.held -= q.bytes - bytes
	q.bytes = bytes
}

// streamStart resolves a consumer's x-stream-offset to the offset it reads
// first: "first", "last", "next" (the default), an offset, a timestamp, or
// an interval back from now ("1h"). RabbitMQ answers a value it cannot use
// with 541.
func streamStart(l *streamLog, v any, now time.Time) (uint64, bool) {
	at := func(t time.Time) uint64 {
		for i, e := range l.entries {
			if !e.at.Before(t) {
				return l.base + uint64(i)
			}
		}
		return l.end()
	}
	switch v := v.(type) {
	case nil:
		return l.end(), true
	case string:
		switch v {
		case "first":
			return l.base, true
		case "last":
			return max(l.base, l.end()-min(l.end(), 1)), true
		case "next":
			return l.end(), true
		}
		age, err := parseStreamAge(v)
		if err != nil {
			return 0, false
		}
		return at(now.Add(-age)), true
	case time.Time:
		return at(v), true
	}
	n, ok := asInt(v)
	if !ok || n < 0 {
		return 0, false
	}
	return max(l.base, uint64(n)), true
}

// dispatchStream delivers to each consumer of the stream q what it has not
// read yet, as far as its credit goes.
func (b *Broker) dispatchStream(q *queue) {
	l := q.stream
	for _, c := range q.consumers {
		c.offset = max(c.offset, l.base) // retention moved on under it
		for c.offset < l.end() && c.canTake() {
			e := l.entries[c.offset-l.base]
			c.ch.deliver(c, q, ready{msg: e.msg})
			c.offset++
		}
	}
}
