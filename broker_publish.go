package main

// Publishing in the embedded broker, and what follows a message out:
// content frames, routing, confirms, acknowledgements and dead-lettering.

import (
	"cmp"
	"slices"
	"strconv"
	"time"
)

// settle handles basic.ack, basic.nack and basic.reject. Settled messages
// leave the broker's memory budget, unless they are requeued; rejected
// ones go to the queue's dead-letter exchange, if it has one.
func (ch *brokerChannel) settle(m method, tag uint64, multiple, requeue bool) *amqpError {
	var done []delivery
	switch {
	case multiple:
		i := 0
		for i < len(ch.unacked) && (tag == 0 || ch.unacked[i].tag <= tag) {
			i++
		}
		if i == 0 && tag != 0 {
			return channelError(replyPreconditionFailed, m, "unknown delivery tag %d", tag)
		}
		done = slices.Clone(ch.unacked[:i])
		ch.unacked = ch.unacked[i:]
	default:
		// Tags are in increasing order: a binary search finds one, and
		// settling the oldest, as most clients do, costs nothing more.
		i, found := slices.BinarySearchFunc(ch.unacked, tag, func(d delivery, t uint64) int { return cmp.Compare(d.tag, t) })
		if !found {
			return channelError(replyPreconditionFailed, m, "unknown delivery tag %d", tag)
		}
		done = []delivery{ch.unacked[i]}
		if i == 0 {
			ch.unacked = ch.unacked[1:]
		} else {
			ch.unacked = slices.Delete(ch.unacked, i, i+1)
		}
	}
	if len(ch.unacked) == 0 {
		ch.unacked = nil // let the old backing array go
	}
	b := ch.conn.broker
	if requeue {
		ch.requeue(done)
	} else {
		now := time.Now()
		for _, d := range done {
			if d.consumer != nil {
				d.consumer.unacked--
			}
			if d.queue.stream != nil {
				continue // acknowledgements on a stream only give back credit
			}
			b.held -= d.msg.size()
			if m != basicAck {
				b.deadLetter(d.queue, ready{msg: d.msg, deaths: d.deaths}, "rejected", now)
			}
		}
	}
	ch.redispatch() // the channel has room for more
	return nil
}

// deadLetter publishes r, which left q for reason ("rejected", "expired"
// or "maxlen"), to q's dead-letter exchange with an x-death header, as
// RabbitMQ does. It does nothing for a queue without one, or past a bound
// on how often a message may be dead-lettered, so that a cycle of
// dead-letter exchanges ends.
func (b *Broker) deadLetter(q *queue, r ready, reason string, now time.Time) {
	const maxDeaths = 16
	if q.deadLetter == nil || r.deaths >= maxDeaths || b.deadLettering >= maxDeaths {
		return
	}
	e, ok := b.exchanges[q.deadLetter.exchange]
	if !ok {
		return
	}
	props, err := decodeProperties(r.msg.props)
	if err != nil {
		return
	}
	props.headers = addDeath(props.headers, q, r.msg, reason, now)
	if props.raw[propExpiration] != nil { // the TTL that expired it does not follow it, as in RabbitMQ
		props.flags &^= 1 << (15 - propExpiration)
		props.raw[propExpiration] = nil
	}
	msg := &message{exchange: e.name, routingKey: r.msg.routingKey, props: props.encode(), body: r.msg.body}
	if q.deadLetter.hasKey {
		msg.routingKey = q.deadLetter.routingKey
	}
	b.deadLettering++
	defer func() { b.deadLettering-- }()
	b.gen++
	for _, dq := range b.route(e, msg.routingKey, b.gen) {
		if b.enqueue(dq, msg, now) {
			dq.messages[len(dq.messages)-1].deaths = r.deaths + 1
		}
		b.dispatch(dq)
	}
}

// addDeath returns headers with an x-death entry for this death: the
// entry for the same queue and reason counts up and moves first.
func addDeath(headers Table, q *queue, msg *message, reason string, now time.Time) Table {
	out := Table{}
	for k, v := range headers {
		out[k] = v
	}
	deaths, _ := out["x-death"].([]any)
	var count int64 = 1
	kept := make([]any, 0, len(deaths)+1)
	for _, d := range deaths {
		t, ok := d.(Table)
		if ok && t["queue"] == q.name && t["reason"] == reason {
			if n, ok := asInt(t["count"]); ok {
				count = int64(n) + 1
			}
			continue
		}
		kept = append(kept, d)
	}
	entry := Table{
		"count":        count,
		"reason":       reason,
		"queue":        q.name,
		"time":         now.Truncate(time.Second),
		"exchange":     msg.exchange,
		"routing-keys": []any{msg.routingKey},
	}
	out["x-death"] = append([]any{entry}, kept...)
	if _, ok := out["x-first-death-reason"]; !ok {
		out["x-first-death-reason"], out["x-first-death-queue"], out["x-first-death-exchange"] = reason, q.name, msg.exchange
	}
	return out
}

// handleContent handles the header and body frames of a publish. Its body
// is read whole before it is routed; while the broker is over its memory
// budget, the body is read and dropped and the publish refused.
func (ch *brokerChannel) handleContent(f frame) *amqpError {
	in := ch.incoming
	if in == nil {
		return connectionError(replyUnexpectedFrame, 0, "content frame without basic.publish on channel %d", ch.id)
	}
	b := ch.conn.broker
	if f.typ == frameHeader {
		if in.haveHead {
			return connectionError(replyUnexpectedFrame, basicPublish, "second content header")
		}
		r := &wireReader{b: f.payload}
		class := r.short()
		r.short() // weight
		in.size = r.longlong()
		if r.err != nil || class != classBasic {
			return connectionError(replyFrameError, basicPublish, "malformed content header")
		}
		if in.size > uint64(b.cfg.MaxMessage) {
			ch.dropIncoming()
			return channelError(replyPreconditionFailed, basicPublish, "message size %d is larger than configured max size %d", in.size, b.cfg.MaxMessage)
		}
		props, err := decodeProperties(r.b)
		if err != nil {
			return connectionError(replyFrameError, basicPublish, "malformed content header: %v", err)
		}
		if exp := props.raw[propExpiration]; exp != nil {
			ms, err := strconv.ParseUint(props.shortstr(propExpiration), 10, 32)
			if err != nil {
				ch.dropIncoming()
				return channelError(replyPreconditionFailed, basicPublish, "invalid expiration '%s': %v", props.shortstr(propExpiration), err)
			}
			in.msg.expires = time.Now().Add(time.Duration(ms) * time.Millisecond)
		}
		in.msg.props = slices.Clone(r.b)
		in.haveHead = true
		in.refused = b.overBudget()
		if !in.refused {
			// Grow the body as it arrives rather than trusting the header.
			in.msg.body = make([]byte, 0, min(in.size, 64<<10))
		}
	} else {
		if !in.haveHead {
			return connectionError(replyUnexpectedFrame, basicPublish, "body frame before content header")
		}
		if in.received+uint64(len(f.payload)) > in.size {
			return connectionError(replyFrameError, basicPublish, "body larger than its header said")
		}
		in.received += uint64(len(f.payload))
		if !in.refused && b.overBudget() {
			// The budget ran out while this body arrived: drop what was kept.
			b.held -= int64(len(in.msg.body))
			in.msg.body, in.refused = nil, true
		}
		if !in.refused {
			in.msg.body = append(in.msg.body, f.payload...)
			b.held += int64(len(f.payload))
		}
	}
	if in.received == in.size {
		ch.incoming = nil
		ch.conn.partial--
		if ch.tx && !in.refused {
			ch.txPublish = append(ch.txPublish, in) // its bytes stay counted until commit or rollback
			return nil
		}
		b.held -= int64(len(in.msg.body)) // publish counts it again where it lands
		ch.publish(in)
	}
	return nil
}

// publish routes a complete message, returns it if it is mandatory and
// reached no queue, and confirms it in confirm mode: a nack when a queue
// refused it or the broker was over its memory budget.
func (ch *brokerChannel) publish(in *incoming) {
	b := ch.conn.broker
	msg := &in.msg
	accepted := !in.refused
	if e, ok := b.exchanges[msg.exchange]; ok && accepted {
		b.gen++
		qs := b.route(e, msg.routingKey, b.gen)
		if len(qs) == 0 && in.mandatory {
			buf := appendMethod(nil, ch.id, basicReturn, func(w *wireWriter) {
				w.short(replyNoRoute)
				w.shortstr("NO_ROUTE")
				w.shortstr(msg.exchange)
				w.shortstr(msg.routingKey)
			})
			ch.conn.send(appendContent(buf, ch.id, msg, ch.conn.frameMax))
		}
		now := time.Now()
		for _, q := range qs {
			if !b.enqueue(q, msg, now) {
				accepted = false
			}
			b.dispatch(q)
		}
	}
	if ch.confirm {
		ch.published++
		ack := basicAck
		if !accepted {
			ack = basicNack
		}
		ch.conn.sendMethod(ch.id, ack, func(w *wireWriter) {
			w.longlong(ch.published)
			w.bit(false) // multiple
			if ack == basicNack {
				w.bit(false) // requeue
			}
		})
	}
}
