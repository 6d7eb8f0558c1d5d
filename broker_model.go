package main

// The embedded broker's model: exchanges, queues, bindings, and how a
// published message is routed to queues and dispatched to consumers.

import (
	"crypto/rand"
	"encoding/base64"
	"slices"
	"strings"
	"time"
)

// exchange routes published messages to the queues bound to it.
type exchange struct {
	name       string
	kind       string // direct, fanout or topic
	durable    bool
	autoDelete bool
	internal   bool
	bindings   []binding
	wasBound   bool // auto-delete exchanges go when their last binding does
}

// binding ties a queue to an exchange under a routing key.
type binding struct {
	queue *queue
	key   string
}

// route returns the queues that a message with key reaches, each once.
func (b *Broker) route(e *exchange, key string) []*queue {
	if e.name == "" {
		if q, ok := b.queues[key]; ok {
			return []*queue{q}
		}
		return nil
	}
	var qs []*queue
	for _, bd := range e.bindings {
		if slices.Contains(qs, bd.queue) {
			continue
		}
		switch e.kind {
		case "fanout":
			qs = append(qs, bd.queue)
		case "direct":
			if bd.key == key {
				qs = append(qs, bd.queue)
			}
		case "topic":
			if topicMatch(strings.Split(bd.key, "."), strings.Split(key, ".")) {
				qs = append(qs, bd.queue)
			}
		}
	}
	return qs
}

// topicMatch matches routing key words against a binding pattern, where
// "*" stands for one word and "#" for zero or more.
func topicMatch(pattern, words []string) bool {
	for len(pattern) > 0 {
		switch p := pattern[0]; p {
		case "#":
			for i := 0; i <= len(words); i++ {
				if topicMatch(pattern[1:], words[i:]) {
					return true
				}
			}
			return false
		default:
			if len(words) == 0 || (p != "*" && p != words[0]) {
				return false
			}
			pattern, words = pattern[1:], words[1:]
		}
	}
	return len(words) == 0
}

// message is one published message. Its properties are kept as the raw
// bytes of the content header, since the broker only passes them on.
type message struct {
	exchange   string
	routingKey string
	props      []byte
	body       []byte
}

// ready is a message waiting in a queue.
type ready struct {
	msg         *message
	redelivered bool
}

// queue holds messages until a consumer takes them.
type queue struct {
	name       string
	durable    bool
	exclusive  *brokerConn // the owner of an exclusive queue, else nil
	autoDelete bool
	maxLength  int
	rejectNew  bool          // x-overflow reject-publish: refuse new messages when full, else drop the oldest
	expires    time.Duration // x-expires: delete the queue once unused for this long; 0 never
	used       uint64        // counts uses, so that an expiry timer knows whether it is stale

	messages  []ready
	consumers []*consumer
	next      int  // round-robin position among consumers
	consumed  bool // auto-delete queues go when their last consumer does
}

// consumer is a subscription of an AMQP channel to a queue.
type consumer struct {
	tag       string
	ch        *brokerChannel
	queue     *queue
	noAck     bool
	exclusive bool
}

// enqueue adds msg to q, dropping the oldest message or refusing msg when
// q is full. It reports whether msg was taken.
func (q *queue) enqueue(msg *message) bool {
	if len(q.messages) >= q.maxLength {
		if q.rejectNew {
			return false
		}
		q.messages = q.messages[1:]
	}
	q.messages = append(q.messages, ready{msg: msg})
	return true
}

// requeue puts deliveries back at the head of q, in their original order,
// marked redelivered.
func (q *queue) requeue(msgs []*message) {
	back := make([]ready, 0, len(msgs)+len(q.messages))
	for _, m := range msgs {
		back = append(back, ready{msg: m, redelivered: true})
	}
	q.messages = append(back, q.messages...)
}

// dispatch hands ready messages to consumers that can take them, round
// robin, until it runs out of one or the other.
func (q *queue) dispatch() {
	for len(q.messages) > 0 && len(q.consumers) > 0 {
		var c *consumer
		for i := range q.consumers {
			candidate := q.consumers[(q.next+i)%len(q.consumers)]
			if candidate.ch.canTake() {
				c = candidate
				q.next = (q.next + i + 1) % len(q.consumers)
				break
			}
		}
		if c == nil {
			return
		}
		r := q.messages[0]
		q.messages[0] = ready{}
		q.messages = q.messages[1:]
		c.ch.deliver(c, q, r)
	}
}

// removeConsumer takes c off its queue, and deletes an auto-delete queue
// whose last consumer it was.
func (b *Broker) removeConsumer(c *consumer) {
	q := c.queue
	q.consumers = slices.DeleteFunc(q.consumers, func(x *consumer) bool { return x == c })
	q.next = 0
	if q.autoDelete && q.consumed && len(q.consumers) == 0 {
		b.deleteQueue(q)
	}
	b.use(q)
}

// use notes that q was used and, if it has an expiry and no consumers,
// deletes it once it has gone unused for that long, as RabbitMQ's
// x-expires does.
func (b *Broker) use(q *queue) {
	q.used++
	if q.expires == 0 || len(q.consumers) > 0 {
		return
	}
	used := q.used
	time.AfterFunc(q.expires, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if q.used == used && len(q.consumers) == 0 {
			b.deleteQueue(q)
		}
	})
}

// deleteQueue removes q and its bindings, cancelling its consumers with a
// basic.cancel (consumer_cancel_notify). It returns how many messages it
// dropped.
func (b *Broker) deleteQueue(q *queue) int {
	if b.queues[q.name] != q {
		return 0
	}
	delete(b.queues, q.name)
	for _, c := range q.consumers {
		delete(c.ch.consumers, c.tag)
		c.ch.conn.sendMethod(c.ch.id, basicCancel, func(w *wireWriter) {
			w.shortstr(c.tag)
			w.bit(true) // no-wait
		})
	}
	q.consumers = nil
	for _, e := range b.exchanges {
		if slices.ContainsFunc(e.bindings, func(bd binding) bool { return bd.queue == q }) {
			e.bindings = slices.DeleteFunc(e.bindings, func(bd binding) bool { return bd.queue == q })
			b.exchangeUnbound(e)
		}
	}
	n := len(q.messages)
	q.messages = nil
	return n
}

// exchangeUnbound deletes an auto-delete exchange that has lost its last
// binding.
func (b *Broker) exchangeUnbound(e *exchange) {
	if e.autoDelete && e.wasBound && len(e.bindings) == 0 {
		delete(b.exchanges, e.name)
	}
}

// newName returns prefix followed by a random URL-safe string, as
// RabbitMQ names queues ("amq.gen-…") and consumers ("amq.ctag-…").
func newName(prefix string) string {
	b := make([]byte, 16)
	rand.Read(b)
	return prefix + base64.RawURLEncoding.EncodeToString(b)
}
