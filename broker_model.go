package main

// The embedded broker's model: exchanges, queues, bindings, and how a
// published message is routed to queues and dispatched to consumers.
//
// Every operation here runs under Broker.mu, so each is linear in what it
// touches, never in what a client may have piled up elsewhere: a binding,
// a consumer and an exclusive queue are each removed in constant time, a
// topic pattern is matched in time proportional to its words times the
// key's, and a publish visits each binding of its exchange once.

import (
	"crypto/rand"
	"encoding/base64"
	"strings"
	"time"
)

// exchange routes published messages to the queues and exchanges bound to
// it.
type exchange struct {
	name       string
	kind       string // direct, fanout or topic
	durable    bool
	autoDelete bool
	internal   bool
	bindings   bindingSet
	sources    bindingSet // the exchange-to-exchange bindings that lead here
	wasBound   bool       // auto-delete exchanges go when their last binding does
	routed     uint64     // the publish that last passed through, to route around cycles
}

// binding ties a queue or an exchange (exactly one is set) to a source
// exchange under a routing key.
type binding struct {
	source *exchange
	queue  *queue
	dest   *exchange
	key    string
}

// bindingSet holds bindings in a slice, for routing to walk, with an
// index for adding and removing one in constant time.
type bindingSet struct {
	list  []*boundTo
	index map[binding]int // position in list
}

// boundTo is one binding with its topic pattern split into words once.
type boundTo struct {
	binding
	words []string // the key split on ".", for topic exchanges
}

// add adds bd unless it is there already, and reports whether it added it.
func (s *bindingSet) add(bd binding) bool {
	if _, ok := s.index[bd]; ok {
		return false
	}
	if s.index == nil {
		s.index = make(map[binding]int)
	}
	s.index[bd] = len(s.list)
	s.list = append(s.list, &boundTo{binding: bd, words: strings.Split(bd.key, ".")})
	return true
}

// remove removes bd if it is there, and reports whether it was.
func (s *bindingSet) remove(bd binding) bool {
	i, ok := s.index[bd]
	if !ok {
		return false
	}
	last := len(s.list) - 1
	s.list[i] = s.list[last]
	s.index[s.list[i].binding] = i
	s.list[last] = nil
	s.list = s.list[:last]
	delete(s.index, bd)
	return true
}

func (s *bindingSet) len() int { return len(s.list) }

// maxExchangeHops bounds how many exchange-to-exchange hops a message may
// take, so that routing is bounded even through a long chain.
const maxExchangeHops = 64

// route returns the queues that a message with key reaches from e, each
// once, following exchange-to-exchange bindings. gen is a number unique
// to this publish: a queue or exchange already stamped with it is not
// visited again, so routing is linear in the bindings it crosses.
func (b *Broker) route(e *exchange, key string, gen uint64) []*queue {
	if e.name == "" {
		if q, ok := b.queues[key]; ok {
			return []*queue{q}
		}
		return nil
	}
	var qs []*queue
	var words []string
	if e.kind == "topic" {
		words = strings.Split(key, ".")
	}
	e.routed = gen
	next := []*exchange{e}
	for hop := 0; len(next) > 0 && hop < maxExchangeHops; hop++ {
		var further []*exchange
		for _, e := range next {
			if e.kind == "topic" && words == nil {
				words = strings.Split(key, ".")
			}
			for _, bd := range e.bindings.list {
				switch {
				case e.kind == "direct" && bd.key != key:
					continue
				case e.kind == "topic" && !topicMatch(bd.words, words):
					continue
				}
				switch {
				case bd.queue != nil && bd.queue.routed != gen:
					bd.queue.routed = gen
					qs = append(qs, bd.queue)
				case bd.dest != nil && bd.dest.routed != gen:
					bd.dest.routed = gen
					further = append(further, bd.dest)
				}
			}
		}
		next = further
	}
	return qs
}

// topicMatch matches routing key words against a binding pattern, where
// "*" stands for one word and "#" for zero or more. It walks the key once,
// keeping the set of pattern positions that match what it has read so far,
// so its time is bounded by len(pattern) × len(words) whatever the
// pattern: backtracking over "#" would be exponential in their number.
func topicMatch(pattern, words []string) bool {
	cur := make([]bool, len(pattern)+1)
	next := make([]bool, len(pattern)+1)
	// skipHashes lets each "#" match zero words.
	skipHashes := func(s []bool) {
		for i, p := range pattern {
			if s[i] && p == "#" {
				s[i+1] = true
			}
		}
	}
	cur[0] = true
	skipHashes(cur)
	for _, w := range words {
		clear(next)
		any := false
		for i, p := range pattern {
			if !cur[i] {
				continue
			}
			switch p {
			case "#":
				next[i], any = true, true // "#" takes this word and may take more
			case "*", w:
				next[i+1], any = true, true
			}
		}
		if !any {
			return false
		}
		skipHashes(next)
		cur, next = next, cur
	}
	return cur[len(pattern)]
}

// message is one published message. Its properties are kept as the raw
// bytes of the content header, since the broker mostly passes them on.
type message struct {
	exchange   string
	routingKey string
	props      []byte
	body       []byte
	expires    time.Time // from the expiration property; zero for none
}

// size is what a message costs the broker's memory budget.
func (m *message) size() int64 {
	return int64(len(m.body) + len(m.props) + len(m.routingKey) + len(m.exchange))
}

// ready is a message waiting in a queue.
type ready struct {
	msg         *message
	redelivered bool
	expires     time.Time // when the queue's x-message-ttl or the message's expiration drops it; zero for never
	deaths      int       // how many times it was dead-lettered, for x-death
}

// queue holds messages until a consumer takes them.
type queue struct {
	name       string
	durable    bool
	exclusive  *brokerConn // the owner of an exclusive queue, else nil
	autoDelete bool
	args       Table // as declared, to compare with a later declare
	maxLength  int
	maxBytes   int64
	rejectNew  bool          // x-overflow reject-publish: refuse new messages when full, else drop the oldest
	expires    time.Duration // x-expires: delete the queue once unused for this long; 0 never
	messageTTL time.Duration // x-message-ttl; 0 with hasTTL false means none
	hasTTL     bool
	deadLetter *deadLetter // x-dead-letter-exchange and -routing-key; nil for none
	bound      bindingSet  // the bindings that lead here
	stream     *streamLog  // the log of a stream queue (x-queue-type stream); nil for a classic queue

	lastUsed time.Time   // for x-expires
	expiry   *time.Timer // the one timer that expires the queue; nil until first needed
	ttlTimer *time.Timer // drops expired messages at the head when nothing else looks
	deleted  bool

	messages  []ready
	bytes     int64 // what the ready messages cost
	consumers []*consumer
	next      int    // round-robin position among consumers
	consumed  bool   // auto-delete queues go when their last consumer does
	routed    uint64 // the publish that last reached it, so that it gets one copy
}

// deadLetter says where a queue's rejected, expired or dropped messages go.
type deadLetter struct {
	exchange   string
	routingKey string // empty: the message's own
	hasKey     bool
}

// consumer is a subscription of an AMQP channel to a queue.
type consumer struct {
	tag       string
	ch        *brokerChannel
	queue     *queue
	noAck     bool
	exclusive bool
	prefetch  int    // basic.qos global=false at the time it was created; 0 none
	unacked   int    // its deliveries not yet acknowledged
	index     int    // position in queue.consumers
	offset    uint64 // on a stream, the offset it reads next
}

// canTake reports whether c may receive another delivery.
func (c *consumer) canTake() bool {
	return (c.prefetch == 0 || c.unacked < c.prefetch) && c.ch.canTake()
}

// full reports whether q holds as much as its limits allow.
func (q *queue) full(extra int64) bool {
	return len(q.messages) >= q.maxLength || q.bytes+extra > q.maxBytes
}

// enqueue adds msg to q, or refuses it when q is full and overflows by
// rejecting publishes. It reports whether msg was taken. The caller
// dispatches, then trims q to its limits: so a message that a waiting
// consumer takes at once is delivered even by a queue of length 0, as in
// RabbitMQ.
func (b *Broker) enqueue(q *queue, msg *message, now time.Time) bool {
	if q.stream != nil {
		b.appendStream(q, msg, now)
		return true
	}
	if q.rejectNew && q.full(msg.size()) {
		return false
	}
	r := ready{msg: msg}
	if q.hasTTL {
		r.expires = now.Add(q.messageTTL)
	}
	if !msg.expires.IsZero() && (r.expires.IsZero() || msg.expires.Before(r.expires)) {
		r.expires = msg.expires
	}
	q.messages = append(q.messages, r)
	q.bytes += msg.size()
	b.held += msg.size()
	return true
}

// take removes and returns the message at the head of q.
func (b *Broker) take(q *queue) ready {
	r := q.messages[0]
	q.messages[0] = ready{}
	q.messages = q.messages[1:]
	q.bytes -= r.msg.size()
	if len(q.messages) == 0 {
		q.messages = nil // let the old backing array go
	}
	return r
}

// trim drops messages from the head of q while it is over its limits
// (x-overflow drop-head) or expired, dead-lettering them if q says so, as
// RabbitMQ does.
func (b *Broker) trim(q *queue, now time.Time) {
	b.dropHead(q, now, true)
}

// dropHead drops expired messages at the head of q and, if overLimit,
// messages that put q over its limits, dead-lettering them if q says so.
func (b *Broker) dropHead(q *queue, now time.Time, overLimit bool) {
	for len(q.messages) > 0 {
		head := q.messages[0]
		expired := !head.expires.IsZero() && !now.Before(head.expires)
		over := overLimit && (len(q.messages) > q.maxLength || q.bytes > q.maxBytes)
		if !expired && !over {
			break
		}
		b.take(q)
		b.held -= head.msg.size()
		reason := "maxlen"
		if expired {
			reason = "expired"
		}
		b.deadLetter(q, head, reason, now)
	}
	b.armTTL(q, now)
}

// armTTL sets q's one timer to drop the head message when it expires, so
// that expired messages leave even when nobody reads the queue.
func (b *Broker) armTTL(q *queue, now time.Time) {
	if len(q.messages) == 0 || q.messages[0].expires.IsZero() || q.deleted {
		return
	}
	wait := q.messages[0].expires.Sub(now) + time.Millisecond
	if q.ttlTimer == nil {
		q.ttlTimer = time.AfterFunc(wait, func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			if !q.deleted {
				b.trim(q, time.Now())
				b.checkBudget()
			}
		})
		return
	}
	q.ttlTimer.Reset(wait)
}

// requeue puts deliveries back at the head of q, in their original order,
// marked redelivered.
func (b *Broker) requeue(q *queue, msgs []*message) {
	back := make([]ready, 0, len(msgs)+len(q.messages))
	for _, m := range msgs {
		back = append(back, ready{msg: m, redelivered: true})
		q.bytes += m.size()
	}
	q.messages = append(back, q.messages...)
}

// dispatch hands ready messages to consumers that can take them, round
// robin, until it runs out of one or the other; expired messages are
// dropped, never delivered. Then it trims q to its limits: a consumer that
// waits gets a message even from a full queue, or one of length 0.
func (b *Broker) dispatch(q *queue) {
	if q.stream != nil {
		b.dispatchStream(q)
		return
	}
	now := time.Now()
	defer b.trim(q, now)
	for len(q.consumers) > 0 {
		if b.dropHead(q, now, false); len(q.messages) == 0 {
			return
		}
		var c *consumer
		for i := range q.consumers {
			candidate := q.consumers[(q.next+i)%len(q.consumers)]
			if candidate.canTake() {
				c = candidate
				q.next = (q.next + i + 1) % len(q.consumers)
				break
			}
		}
		if c == nil {
			return
		}
		c.ch.deliver(c, q, b.take(q))
	}
}

// addConsumer puts c on its queue.
func (b *Broker) addConsumer(c *consumer) {
	q := c.queue
	c.index = len(q.consumers)
	q.consumers = append(q.consumers, c)
	q.consumed = true
	b.consumers++
}

// removeConsumer takes c off its queue in constant time, and deletes an
// auto-delete queue whose last consumer it was.
func (b *Broker) removeConsumer(c *consumer) {
	q := c.queue
	if c.index < 0 || c.index >= len(q.consumers) || q.consumers[c.index] != c {
		return
	}
	last := len(q.consumers) - 1
	q.consumers[c.index] = q.consumers[last]
	q.consumers[c.index].index = c.index
	q.consumers[last] = nil
	q.consumers = q.consumers[:last]
	c.index = -1
	b.consumers--
	if q.next >= len(q.consumers) {
		q.next = 0
	}
	if q.autoDelete && q.consumed && len(q.consumers) == 0 {
		b.deleteQueue(q)
		return
	}
	b.use(q)
}

// use notes that q was used and, if it has an expiry and no consumers,
// deletes it once it has gone unused for that long, as RabbitMQ's
// x-expires does. Each queue has one timer, however often it is used.
func (b *Broker) use(q *queue) {
	q.lastUsed = time.Now()
	if q.expires == 0 || len(q.consumers) > 0 || q.deleted {
		return
	}
	if q.expiry == nil {
		q.expiry = time.AfterFunc(q.expires, func() { b.expire(q) })
		return
	}
	q.expiry.Reset(q.expires)
}

// expire deletes q if it has gone unused for its x-expires; it runs on
// q's expiry timer.
func (b *Broker) expire(q *queue) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if q.deleted || len(q.consumers) > 0 {
		return // a consumer holds it; the last to leave re-arms the timer
	}
	if idle := time.Since(q.lastUsed); idle < q.expires {
		q.expiry.Reset(q.expires - idle)
		return
	}
	b.deleteQueue(q)
	b.checkBudget()
}

// bind adds a binding, reporting whether it was new.
func (b *Broker) bind(bd binding) bool {
	if !bd.source.bindings.add(bd) {
		return false
	}
	bd.source.wasBound = true
	b.nbindings++
	if bd.queue != nil {
		(&bd.queue.bound).add(bd)
	} else {
		(&bd.dest.sources).add(bd)
	}
	return true
}

// unbind removes a binding, and an auto-delete source left with none.
func (b *Broker) unbind(bd binding) {
	if !bd.source.bindings.remove(bd) {
		return
	}
	b.nbindings--
	if bd.queue != nil {
		(&bd.queue.bound).remove(bd)
	} else {
		(&bd.dest.sources).remove(bd)
	}
	b.exchangeUnbound(bd.source)
}

// deleteQueue removes q and its bindings, cancelling its consumers with a
// basic.cancel (consumer_cancel_notify). It returns how many messages it
// dropped.
func (b *Broker) deleteQueue(q *queue) int {
	if b.queues[q.name] != q {
		return 0
	}
	delete(b.queues, q.name)
	q.deleted = true
	if q.expiry != nil {
		q.expiry.Stop()
	}
	if q.ttlTimer != nil {
		q.ttlTimer.Stop()
	}
	if q.exclusive != nil {
		delete(q.exclusive.exclusive, q)
	}
	for _, c := range q.consumers {
		delete(c.ch.consumers, c.tag)
		c.index = -1
		b.consumers--
		c.ch.conn.sendMethod(c.ch.id, basicCancel, func(w *wireWriter) {
			w.shortstr(c.tag)
			w.bit(true) // no-wait
		})
	}
	q.consumers = nil
	for _, bd := range append([]*boundTo(nil), (&q.bound).list...) {
		b.unbind(bd.binding)
	}
	n := len(q.messages)
	if q.stream != nil {
		n = len(q.stream.entries)
		q.stream.entries = nil
	}
	b.held -= q.bytes
	q.messages, q.bytes = nil, 0
	return n
}

// deleteExchange removes e with the bindings from it and to it.
func (b *Broker) deleteExchange(e *exchange) {
	delete(b.exchanges, e.name)
	for _, bd := range append([]*boundTo(nil), e.bindings.list...) {
		b.unbind(bd.binding)
	}
	for _, bd := range append([]*boundTo(nil), (&e.sources).list...) {
		b.unbind(bd.binding)
	}
}

// exchangeUnbound deletes an auto-delete exchange that has lost its last
// binding.
func (b *Broker) exchangeUnbound(e *exchange) {
	if e.autoDelete && e.wasBound && e.bindings.len() == 0 && b.exchanges[e.name] == e {
		b.deleteExchange(e)
	}
}

// newName returns prefix followed by a random URL-safe string, as
// RabbitMQ names queues ("amq.gen-…") and consumers ("amq.ctag-…").
func newName(prefix string) string {
	b := make([]byte, 16)
	rand.Read(b)
	return prefix + base64.RawURLEncoding.EncodeToString(b)
}
