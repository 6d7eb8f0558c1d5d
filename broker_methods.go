package main

// The methods an AMQP channel of the embedded broker answers: the
// channel, exchange, queue, basic, confirm and tx classes.

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// maxBindings bounds the bindings of the whole broker: each holds a
// routing key of up to 255 bytes, so this bounds their memory too.
const maxBindings = 1 << 20

// handleMethod handles a method frame on an open channel.
func (ch *brokerChannel) handleMethod(payload []byte) *amqpError {
	r := &wireReader{b: payload}
	m := method(r.long())
	if ch.incoming != nil {
		return connectionError(replyUnexpectedFrame, m, "method %d.%d inside content", m.class(), m.id())
	}
	b, c := ch.conn.broker, ch.conn
	// reply sends m's answer unless the client asked for none.
	reply := func(noWait bool, ok method, args func(w *wireWriter)) {
		if !noWait {
			c.sendMethod(ch.id, ok, args)
		}
	}
	// syntax reports arguments that did not parse.
	syntax := func() *amqpError {
		if r.err != nil {
			return connectionError(replySyntaxError, m, "%v", r.err)
		}
		return nil
	}

	switch m {
	case channelOpen:
		return connectionError(replyChannelError, m, "channel %d is already open", ch.id)

	case channelClose:
		ch.close()
		delete(c.channels, ch.id)
		c.sendMethod(ch.id, channelCloseOk, nil)
		return nil

	case channelFlow:
		active := r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if !active { // RabbitMQ does not stop deliveries on request either
			return connectionError(replyNotImplemented, m, "active=false")
		}
		reply(false, channelFlowOk, func(w *wireWriter) { w.bit(true) })
		return nil

	case exchangeDeclare:
		r.short()
		name, kind := r.shortstr(), r.shortstr()
		passive, durable, autoDelete, internal, noWait := r.bit(), r.bit(), r.bit(), r.bit(), r.bit()
		args := r.table()
		if err := syntax(); err != nil {
			return err
		}
		e, exists := b.exchanges[name]
		switch {
		case passive && !exists:
			return channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", name)
		case passive:
		case name == "" || (strings.HasPrefix(name, "amq.") && !exists):
			return channelError(replyAccessRefused, m, "exchange name '%s' contains reserved prefix 'amq.*'", name)
		case kind != "direct" && kind != "fanout" && kind != "topic":
			return connectionError(replyCommandInvalid, m, "invalid exchange type '%s'", kind)
		case args["alternate-exchange"] != nil:
			return connectionError(replyNotImplemented, m, "alternate-exchange is not implemented by the embedded broker")
		case exists && e.kind != kind:
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'type' for exchange '%s' in vhost '/': received '%s' but current is '%s'", name, kind, e.kind)
		case exists && e.durable != durable:
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'durable' for exchange '%s' in vhost '/': received '%t' but current is '%t'", name, durable, e.durable)
		case !exists && len(b.exchanges) >= b.cfg.MaxExchanges:
			return channelError(replyPreconditionFailed, m, "cannot declare exchange '%s' in vhost '/': exchange limit (%d) is reached", name, b.cfg.MaxExchanges)
		case !exists:
			b.exchanges[name] = &exchange{name: name, kind: kind, durable: durable, autoDelete: autoDelete, internal: internal}
		}
		reply(noWait, exchangeDeclareOk, nil)
		return nil

	case exchangeDelete:
		r.short()
		name, ifUnused, noWait := r.shortstr(), r.bit(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		e, exists := b.exchanges[name]
		switch {
		case name == "" || strings.HasPrefix(name, "amq."):
			return channelError(replyAccessRefused, m, "operation not permitted on the default exchange or 'amq.*' exchanges")
		case exists && ifUnused && e.bindings.len() > 0:
			return channelError(replyPreconditionFailed, m, "exchange '%s' in vhost '/' in use", name)
		case exists:
			b.deleteExchange(e)
		}
		reply(noWait, exchangeDeleteOk, nil)
		return nil

	case exchangeBind, exchangeUnbind:
		r.short()
		dname, sname, key, noWait := r.shortstr(), r.shortstr(), r.shortstr(), r.bit()
		r.table()
		if err := syntax(); err != nil {
			return err
		}
		dest, err := ch.findExchange(m, dname)
		if err != nil {
			return err
		}
		source, err := ch.findExchange(m, sname)
		if err != nil {
			return err
		}
		ok := exchangeBindOk
		if m == exchangeUnbind {
			ok = exchangeUnbindOk
		}
		return ch.changeBinding(m, binding{source: source, dest: dest, key: key}, m == exchangeUnbind, noWait, ok)

	case queueDeclare:
		r.short()
		name := r.shortstr()
		passive, durable, exclusive, autoDelete, noWait := r.bit(), r.bit(), r.bit(), r.bit(), r.bit()
		args := r.table()
		if err := syntax(); err != nil {
			return err
		}
		if name == "" && !passive {
			name = newName("amq.gen-")
		}
		q, exists := b.queues[name]
		switch {
		case passive && !exists:
			return channelError(replyNotFound, m, "no queue '%s' in vhost '/'", name)
		case exists && q.exclusive != nil && q.exclusive != c:
			return channelError(replyResourceLocked, m, "cannot obtain exclusive access to locked queue '%s' in vhost '/'", name)
		case passive:
		case !exists && strings.HasPrefix(name, "amq.") && !strings.HasPrefix(name, "amq.gen-"):
			return channelError(replyAccessRefused, m, "queue name '%s' contains reserved prefix 'amq.*'", name)
		case exists && (q.durable != durable || (q.exclusive != nil) != exclusive || q.autoDelete != autoDelete):
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'durable', 'exclusive' or 'auto_delete' for queue '%s' in vhost '/'", name)
		case exists:
			if err := q.equivalent(args, m); err != nil {
				return err
			}
		case len(b.queues) >= b.cfg.MaxQueues:
			return channelError(replyPreconditionFailed, m, "cannot declare queue '%s' in vhost '/': queue limit (%d) is reached", name, b.cfg.MaxQueues)
		default:
			q = &queue{name: name, durable: durable, autoDelete: autoDelete, maxLength: b.cfg.MaxQueueLength, maxBytes: b.cfg.MaxQueueBytes}
			var err *amqpError
			if args["x-queue-type"] == "stream" {
				err = newStream(q, durable, exclusive, autoDelete, args, m)
			} else {
				err = q.applyArguments(args, m)
			}
			if err != nil {
				return err
			}
			if exclusive {
				q.exclusive = c
				c.exclusive[q] = struct{}{}
			}
			b.queues[name] = q
		}
		b.use(q)
		ch.lastQueue = name
		reply(noWait, queueDeclareOk, func(w *wireWriter) {
			w.shortstr(name)
			w.long(uint32(len(q.messages)))
			w.long(uint32(len(q.consumers)))
		})
		return nil

	case queueBind, queueUnbind:
		r.short()
		qname, ename, key := r.shortstr(), r.shortstr(), r.shortstr()
		noWait := m == queueBind && r.bit()
		r.table()
		if err := syntax(); err != nil {
			return err
		}
		q, e, err := ch.queueAndExchange(m, qname, ename)
		if err != nil {
			return err
		}
		ok := queueBindOk
		if m == queueUnbind {
			ok = queueUnbindOk
		}
		return ch.changeBinding(m, binding{source: e, queue: q, key: key}, m == queueUnbind, noWait, ok)

	case queuePurge:
		r.short()
		qname, noWait := r.shortstr(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
		}
		if err := classicOnly(m, q, "queue.purge"); err != nil {
			return err
		}
		n := len(q.messages)
		b.held -= q.bytes
		q.messages, q.bytes = nil, 0
		reply(noWait, queuePurgeOk, func(w *wireWriter) { w.long(uint32(n)) })
		return nil

	case queueDelete:
		r.short()
		qname, ifUnused, ifEmpty, noWait := r.shortstr(), r.bit(), r.bit(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if qname == "" {
			qname = ch.lastQueue
		}
		q, exists := b.queues[qname]
		n := 0
		switch {
		case !exists: // deleting what is not there succeeds, as in RabbitMQ
		case q.exclusive != nil && q.exclusive != c:
			return channelError(replyResourceLocked, m, "cannot obtain exclusive access to locked queue '%s' in vhost '/'", qname)
		case ifUnused && len(q.consumers) > 0:
			return channelError(replyPreconditionFailed, m, "queue '%s' in vhost '/' in use", qname)
		case ifEmpty && len(q.messages) > 0:
			return channelError(replyPreconditionFailed, m, "queue '%s' in vhost '/' is not empty", qname)
		default:
			n = b.deleteQueue(q)
		}
		reply(noWait, queueDeleteOk, func(w *wireWriter) { w.long(uint32(n)) })
		return nil

	case basicQos:
		size, count, global := r.long(), r.short(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if size != 0 {
			return connectionError(replyNotImplemented, m, "prefetch_size!=0 (%d)", size)
		}
		// As in RabbitMQ: global=false limits each consumer the channel
		// creates from now on, global=true the channel as a whole.
		if global {
			ch.prefetch = int(count)
		} else {
			ch.consumerPrefetch = int(count)
		}
		reply(false, basicQosOk, nil)
		ch.redispatch()
		return nil

	case basicConsume:
		r.short()
		qname, tag := r.shortstr(), r.shortstr()
		r.bit() // no-local: RabbitMQ ignores it too
		noAck, exclusive, noWait := r.bit(), r.bit(), r.bit()
		args := r.table()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
		}
		for _, arg := range []string{"x-priority", "x-cancel-on-ha-failover"} {
			if _, ok := args[arg]; ok {
				return connectionError(replyNotImplemented, m, "consumer argument %s is not implemented by the embedded broker", arg)
			}
		}
		var offset uint64
		if q.stream != nil {
			switch {
			case noAck:
				return connectionError(replyNotImplemented, m, "automatic acknowledgement not supported by stream queues queue '%s' in vhost '/'", q.name)
			case ch.consumerPrefetch == 0:
				return channelError(replyPreconditionFailed, m, "consumer prefetch count is not set for 'queue '%s' in vhost '/''", q.name)
			}
			var ok bool
			if offset, ok = streamStart(q.stream, args["x-stream-offset"], time.Now()); !ok {
				return channelError(replyInternalError, m, "INTERNAL_ERROR")
			}
		}
		if tag == "" {
			tag = newName("amq.ctag-")
		}
		if _, dup := ch.consumers[tag]; dup {
			return connectionError(replyNotAllowed, m, "attempt to reuse consumer tag '%s'", tag)
		}
		if len(q.consumers) > 0 && (exclusive || q.consumers[0].exclusive) {
			return channelError(replyAccessRefused, m, "queue '%s' in vhost '/' in exclusive use", q.name)
		}
		if b.consumers >= b.cfg.MaxConsumers {
			return channelError(replyPreconditionFailed, m, "cannot consume from queue '%s': consumer limit (%d) is reached", q.name, b.cfg.MaxConsumers)
		}
		cons := &consumer{tag: tag, ch: ch, queue: q, noAck: noAck, exclusive: exclusive, prefetch: ch.consumerPrefetch, offset: offset}
		ch.consumers[tag] = cons
		b.addConsumer(cons)
		reply(noWait, basicConsumeOk, func(w *wireWriter) { w.shortstr(tag) })
		b.dispatch(q)
		return nil

	case basicCancel:
		tag, noWait := r.shortstr(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if cons, ok := ch.consumers[tag]; ok {
			delete(ch.consumers, tag)
			b.removeConsumer(cons)
		}
		reply(noWait, basicCancelOk, func(w *wireWriter) { w.shortstr(tag) })
		return nil

	case basicPublish:
		r.short()
		ename, key, mandatory, immediate := r.shortstr(), r.shortstr(), r.bit(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if immediate {
			return connectionError(replyNotImplemented, m, "immediate=true")
		}
		e, ok := b.exchanges[ename]
		if !ok {
			return channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", ename)
		}
		if e.internal {
			return channelError(replyAccessRefused, m, "cannot publish to internal exchange '%s' in vhost '/'", ename)
		}
		ch.incoming = &incoming{
			msg:       message{exchange: ename, routingKey: key},
			mandatory: mandatory,
			deadline:  time.Now().Add(b.cfg.ContentTimeout),
		}
		c.partial++
		return nil

	case basicGet:
		r.short()
		qname, noAck := r.shortstr(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
		}
		if err := classicOnly(m, q, "basic.get"); err != nil {
			return err
		}
		b.trim(q, time.Now()) // expired messages are never got
		b.use(q)
		if len(q.messages) == 0 {
			c.sendMethod(ch.id, basicGetEmpty, func(w *wireWriter) { w.shortstr("") })
			return nil
		}
		rd := b.take(q)
		ch.nextTag++
		if noAck {
			b.held -= rd.msg.size()
		} else {
			ch.unacked = append(ch.unacked, delivery{tag: ch.nextTag, msg: rd.msg, queue: q, deaths: rd.deaths})
		}
		buf := appendMethod(nil, ch.id, basicGetOk, func(w *wireWriter) {
			w.longlong(ch.nextTag)
			w.bit(rd.redelivered)
			w.shortstr(rd.msg.exchange)
			w.shortstr(rd.msg.routingKey)
			w.long(uint32(len(q.messages)))
		})
		c.send(appendContent(buf, ch.id, rd.msg, c.frameMax))
		return nil

	case basicAck, basicNack, basicReject:
		tag := r.longlong()
		multiple := m != basicReject && r.bit()
		requeue := m != basicAck && r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if ch.tx {
			ch.txSettle = append(ch.txSettle, settlement{m, tag, multiple, requeue})
			return nil
		}
		return ch.settle(m, tag, multiple, requeue)

	case basicRecover, basicRecoverAsync:
		if requeue := r.bit(); !requeue {
			return connectionError(replyNotImplemented, m, "requeue=false")
		}
		unacked := ch.unacked
		ch.unacked = nil
		ch.requeue(unacked)
		if m == basicRecover {
			reply(false, basicRecoverOk, nil)
		}
		return syntax()

	case confirmSelect:
		noWait := r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if ch.tx {
			return channelError(replyPreconditionFailed, m, "cannot switch from tx to confirm mode")
		}
		ch.confirm = true
		reply(noWait, confirmSelectOk, nil)
		return nil

	case txSelect:
		if ch.confirm {
			return channelError(replyPreconditionFailed, m, "cannot switch from confirm to tx mode")
		}
		ch.tx = true
		reply(false, txSelectOk, nil)
		return nil

	case txCommit, txRollback:
		if !ch.tx {
			return channelError(replyPreconditionFailed, m, "channel is not transactional")
		}
		publishes, settles := ch.txPublish, ch.txSettle
		ch.txPublish, ch.txSettle = nil, nil
		for _, in := range publishes {
			b.held -= int64(len(in.msg.body)) // publish counts it again where it lands
			if m == txCommit {
				ch.publish(in)
			}
		}
		if m == txCommit {
			for _, s := range settles {
				if err := ch.settle(s.m, s.tag, s.multiple, s.requeue); err != nil {
					return err
				}
			}
			reply(false, txCommitOk, nil)
		} else {
			reply(false, txRollbackOk, nil)
		}
		return nil
	}
	return connectionError(replyNotImplemented, m, "method %d.%d is not implemented by the embedded broker", m.class(), m.id())
}

// changeBinding adds bd, within the broker's binding limit, or removes it,
// and answers m with ok unless the client asked for no answer.
func (ch *brokerChannel) changeBinding(m method, bd binding, remove, noWait bool, ok method) *amqpError {
	b := ch.conn.broker
	switch {
	case remove:
		b.unbind(bd)
	case b.nbindings >= maxBindings:
		return channelError(replyPreconditionFailed, m, "binding limit (%d) is reached", maxBindings)
	default:
		b.bind(bd)
	}
	if !noWait {
		ch.conn.sendMethod(ch.id, ok, nil)
	}
	return nil
}

// queueArguments are the queue arguments the broker implements; any other
// x- argument that RabbitMQ gives a meaning to is refused (see
// applyArguments), never accepted and ignored.
var queueArguments = []string{"x-max-length", "x-max-length-bytes", "x-overflow", "x-expires", "x-message-ttl", "x-dead-letter-exchange", "x-dead-letter-routing-key", "x-queue-type"}

// unimplementedQueueArguments are RabbitMQ's queue arguments that the
// embedded broker does not implement.
var unimplementedQueueArguments = []string{"x-max-priority", "x-single-active-consumer", "x-delivery-limit", "x-quorum-initial-group-size", "x-dead-letter-strategy", "x-queue-master-locator"}

// applyArguments reads the queue arguments, refusing with RabbitMQ's
// error those it does not implement.
func (q *queue) applyArguments(args Table, m method) *amqpError {
	invalid := func(arg string) *amqpError {
		return channelError(replyPreconditionFailed, m, "invalid arg '%s' for queue '%s' in vhost '/': %v", arg, q.name, args[arg])
	}
	for _, arg := range unimplementedQueueArguments {
		if _, ok := args[arg]; ok {
			return connectionError(replyNotImplemented, m, "queue argument %s is not implemented by the embedded broker", arg)
		}
	}
	if v, ok := args["x-queue-type"]; ok && v != "classic" {
		return connectionError(replyNotImplemented, m, "queue type '%v' is not implemented by the embedded broker", v)
	}
	for _, arg := range []string{"x-max-age", "x-stream-max-segment-size-bytes", "x-initial-cluster-size", "x-queue-leader-locator"} {
		if _, ok := args[arg]; ok {
			return channelError(replyPreconditionFailed, m, "invalid arg '%s' for queue '%s' in vhost '/': only streams take it", arg, q.name)
		}
	}
	if v, ok := args["x-max-length"]; ok {
		n, ok := asInt(v)
		if !ok || n < 0 {
			return invalid("x-max-length")
		}
		q.maxLength = min(q.maxLength, n)
	}
	if v, ok := args["x-max-length-bytes"]; ok {
		n, ok := asInt(v)
		if !ok || n < 0 {
			return invalid("x-max-length-bytes")
		}
		q.maxBytes = min(q.maxBytes, int64(n))
	}
	if v, ok := args["x-expires"]; ok {
		n, ok := asInt(v)
		if !ok || n <= 0 {
			return invalid("x-expires")
		}
		q.expires = time.Duration(n) * time.Millisecond
	}
	if v, ok := args["x-message-ttl"]; ok {
		n, ok := asInt(v)
		if !ok || n < 0 {
			return invalid("x-message-ttl")
		}
		q.messageTTL, q.hasTTL = time.Duration(n)*time.Millisecond, true
	}
	if v, ok := args["x-overflow"]; ok {
		switch v {
		case "drop-head":
		case "reject-publish":
			q.rejectNew = true
		default:
			return invalid("x-overflow")
		}
	}
	if v, ok := args["x-dead-letter-exchange"]; ok {
		name, ok := v.(string)
		if !ok {
			return invalid("x-dead-letter-exchange")
		}
		q.deadLetter = &deadLetter{exchange: name}
	}
	if v, ok := args["x-dead-letter-routing-key"]; ok {
		key, ok := v.(string)
		if !ok || q.deadLetter == nil {
			return invalid("x-dead-letter-routing-key")
		}
		q.deadLetter.routingKey, q.deadLetter.hasKey = key, true
	}
	q.args = Table{}
	for _, arg := range queueArguments {
		if v, ok := args[arg]; ok {
			q.args[arg] = v
		}
	}
	return nil
}

// equivalent checks a redeclaration's arguments against q's, as RabbitMQ
// does: a difference in any argument it implements closes the channel
// with 406.
func (q *queue) equivalent(args Table, m method) *amqpError {
	known := queueArguments
	if q.stream != nil {
		known = slices.Sorted(maps.Keys(streamArguments))
	}
	for _, arg := range known {
		have, had := q.args[arg]
		got, gets := args[arg]
		if arg == "x-queue-type" && q.stream == nil {
			have, had, got, gets = "classic", true, cmp.Or(got, any("classic")), true // no type means classic
		}
		if had != gets || fmt.Sprint(normalize(have)) != fmt.Sprint(normalize(got)) {
			return channelError(replyPreconditionFailed, m, "inequivalent arg '%s' for queue '%s' in vhost '/': received %s but current is %s", arg, q.name, describeArg(got, gets), describeArg(have, had))
		}
	}
	return nil
}

// normalize makes integers of every width compare equal.
func normalize(v any) any {
	if n, ok := asInt(v); ok {
		return int64(n)
	}
	return v
}

// describeArg says what an argument was, as RabbitMQ's errors do.
func describeArg(v any, present bool) string {
	if !present {
		return "none"
	}
	return fmt.Sprintf("the value '%v'", v)
}

// asInt converts an integer table value to int.
func asInt(v any) (int, bool) {
	switch n := v.(type) {
	case int8:
		return int(n), true
	case uint8:
		return int(n), true
	case int16:
		return int(n), true
	case uint16:
		return int(n), true
	case int32:
		return int(n), true
	case uint32:
		return int(n), true
	case int64:
		return int(n), true
	}
	return 0, false
}

// classicOnly refuses what a stream does not do, with RabbitMQ's words.
func classicOnly(m method, q *queue, what string) *amqpError {
	if q.stream != nil {
		return connectionError(replyNotImplemented, m, "%s not supported by stream queues queue '%s' in vhost '/'", what, q.name)
	}
	return nil
}

// findQueue returns the queue called name (the channel's last declared
// queue if name is empty), checking exclusive ownership.
func (ch *brokerChannel) findQueue(m method, name string) (*queue, *amqpError) {
	if name == "" {
		name = ch.lastQueue
	}
	q, ok := ch.conn.broker.queues[name]
	if !ok {
		return nil, channelError(replyNotFound, m, "no queue '%s' in vhost '/'", name)
	}
	if q.exclusive != nil && q.exclusive != ch.conn {
		return nil, channelError(replyResourceLocked, m, "cannot obtain exclusive access to locked queue '%s' in vhost '/'", name)
	}
	return q, nil
}

// findExchange returns the exchange called name, for a binding: never the
// default exchange.
func (ch *brokerChannel) findExchange(m method, name string) (*exchange, *amqpError) {
	if name == "" {
		return nil, channelError(replyAccessRefused, m, "operation not permitted on the default exchange")
	}
	e, ok := ch.conn.broker.exchanges[name]
	if !ok {
		return nil, channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", name)
	}
	return e, nil
}

// queueAndExchange looks up both ends of a binding.
func (ch *brokerChannel) queueAndExchange(m method, qname, ename string) (*queue, *exchange, *amqpError) {
	q, err := ch.findQueue(m, qname)
	if err != nil {
		return nil, nil, err
	}
	e, err := ch.findExchange(m, ename)
	if err != nil {
		return nil, nil, err
	}
	return q, e, nil
}
