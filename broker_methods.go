package main

// The methods an AMQP channel of the embedded broker answers: exchange,
// queue, basic and confirm classes.

import (
	"slices"
	"strings"
	"time"
)

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
		ch.active = r.bit()
		reply(false, channelFlowOk, func(w *wireWriter) { w.bit(ch.active) })
		ch.redispatch()
		return syntax()

	case exchangeDeclare:
		r.short()
		name, kind := r.shortstr(), r.shortstr()
		passive, durable, autoDelete, internal, noWait := r.bit(), r.bit(), r.bit(), r.bit(), r.bit()
		r.table()
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
		case exists && e.kind != kind:
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'type' for exchange '%s' in vhost '/': received '%s' but current is '%s'", name, kind, e.kind)
		case exists && e.durable != durable:
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'durable' for exchange '%s' in vhost '/': received '%t' but current is '%t'", name, durable, e.durable)
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
		case exists && ifUnused && len(e.bindings) > 0:
			return channelError(replyPreconditionFailed, m, "exchange '%s' in vhost '/' in use", name)
		}
		delete(b.exchanges, name)
		reply(noWait, exchangeDeleteOk, nil)
		return nil

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
		case !exists:
			q = &queue{name: name, durable: durable, autoDelete: autoDelete, maxLength: b.cfg.MaxQueueLength}
			if exclusive {
				q.exclusive = c
			}
			if err := q.applyArguments(args, m); err != nil {
				return err
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
		bd := binding{queue: q, key: key}
		if m == queueBind {
			if !slices.Contains(e.bindings, bd) {
				e.bindings = append(e.bindings, bd)
				e.wasBound = true
			}
			reply(noWait, queueBindOk, nil)
			return nil
		}
		e.bindings = slices.DeleteFunc(e.bindings, func(x binding) bool { return x == bd })
		b.exchangeUnbound(e)
		reply(false, queueUnbindOk, nil)
		return nil

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
		n := len(q.messages)
		q.messages = nil
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
		size, count := r.long(), r.short()
		r.bit() // global: the limit is per channel either way
		if err := syntax(); err != nil {
			return err
		}
		if size != 0 {
			return connectionError(replyNotImplemented, m, "prefetch_size!=0 (%d)", size)
		}
		ch.prefetch = int(count)
		reply(false, basicQosOk, nil)
		ch.redispatch()
		return nil

	case basicConsume:
		r.short()
		qname, tag := r.shortstr(), r.shortstr()
		r.bit() // no-local: RabbitMQ ignores it too
		noAck, exclusive, noWait := r.bit(), r.bit(), r.bit()
		r.table()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
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
		cons := &consumer{tag: tag, ch: ch, queue: q, noAck: noAck, exclusive: exclusive}
		ch.consumers[tag] = cons
		q.consumers = append(q.consumers, cons)
		q.consumed = true
		q.used++ // stops any expiry timer
		reply(noWait, basicConsumeOk, func(w *wireWriter) { w.shortstr(tag) })
		q.dispatch()
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
		ch.incoming = &incoming{msg: message{exchange: ename, routingKey: key}, mandatory: mandatory}
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
		if len(q.messages) == 0 {
			c.sendMethod(ch.id, basicGetEmpty, func(w *wireWriter) { w.shortstr("") })
			return nil
		}
		rd := q.messages[0]
		q.messages = q.messages[1:]
		b.use(q)
		ch.nextTag++
		if !noAck {
			ch.unacked = append(ch.unacked, delivery{tag: ch.nextTag, msg: rd.msg, queue: q})
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
		ch.confirm = true
		reply(noWait, confirmSelectOk, nil)
		return nil
	}
	return connectionError(replyNotImplemented, m, "method %d.%d is not implemented by the embedded broker", m.class(), m.id())
}

// applyArguments reads the queue arguments the broker understands:
// x-max-length and x-overflow.
func (q *queue) applyArguments(args Table, m method) *amqpError {
	if v, ok := args["x-max-length"]; ok {
		n, ok := asInt(v)
		if !ok || n < 0 {
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-max-length' for queue '%s' in vhost '/'", q.name)
		}
		q.maxLength = min(q.maxLength, n)
	}
	if v, ok := args["x-expires"]; ok {
		n, ok := asInt(v)
		if !ok || n <= 0 {
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-expires' for queue '%s' in vhost '/'", q.name)
		}
		q.expires = time.Duration(n) * time.Millisecond
	}
	if v, ok := args["x-overflow"]; ok {
		switch v {
		case "drop-head":
		case "reject-publish":
			q.rejectNew = true
		default:
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-overflow' for queue '%s' in vhost '/'", q.name)
		}
	}
	return nil
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

// queueAndExchange looks up both ends of a binding.
func (ch *brokerChannel) queueAndExchange(m method, qname, ename string) (*queue, *exchange, *amqpError) {
	q, err := ch.findQueue(m, qname)
	if err != nil {
		return nil, nil, err
	}
	if ename == "" {
		return nil, nil, channelError(replyAccessRefused, m, "operation not permitted on the default exchange")
	}
	e, ok := ch.conn.broker.exchanges[ename]
	if !ok {
		return nil, nil, channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", ename)
	}
	return q, e, nil
}

// settle handles basic.ack, basic.nack and basic.reject.
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
		ch.unacked = slices.Delete(ch.unacked, 0, i)
	default:
		i := slices.IndexFunc(ch.unacked, func(d delivery) bool { return d.tag == tag })
		if i < 0 {
			return channelError(replyPreconditionFailed, m, "unknown delivery tag %d", tag)
		}
		done = []delivery{ch.unacked[i]}
		ch.unacked = slices.Delete(ch.unacked, i, i+1)
	}
	if requeue {
		ch.requeue(done)
	}
	ch.redispatch() // the channel has room for more
	return nil
}

// handleContent handles the header and body frames of a publish.
func (ch *brokerChannel) handleContent(f frame) *amqpError {
	in := ch.incoming
	if in == nil {
		return connectionError(replyUnexpectedFrame, 0, "content frame without basic.publish on channel %d", ch.id)
	}
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
		if in.size > uint64(ch.conn.broker.cfg.MaxMessage) {
			ch.incoming = nil
			return channelError(replyPreconditionFailed, basicPublish, "message size %d is larger than configured max size %d", in.size, ch.conn.broker.cfg.MaxMessage)
		}
		in.msg.props = slices.Clone(r.b)
		in.haveHead = true
		// Grow the body as it arrives rather than trusting the header.
		in.msg.body = make([]byte, 0, min(in.size, 64<<10))
	} else {
		if !in.haveHead {
			return connectionError(replyUnexpectedFrame, basicPublish, "body frame before content header")
		}
		if uint64(len(in.msg.body)+len(f.payload)) > in.size {
			return connectionError(replyFrameError, basicPublish, "body larger than its header said")
		}
		in.msg.body = append(in.msg.body, f.payload...)
	}
	if uint64(len(in.msg.body)) == in.size {
		ch.incoming = nil
		ch.publish(in)
	}
	return nil
}

// publish routes a complete message, returns it if it is mandatory and
// reached no queue, and confirms it in confirm mode.
func (ch *brokerChannel) publish(in *incoming) {
	b := ch.conn.broker
	msg := &in.msg
	accepted := true
	if e, ok := b.exchanges[msg.exchange]; ok {
		qs := b.route(e, msg.routingKey)
		if len(qs) == 0 && in.mandatory {
			buf := appendMethod(nil, ch.id, basicReturn, func(w *wireWriter) {
				w.short(replyNoRoute)
				w.shortstr("NO_ROUTE")
				w.shortstr(msg.exchange)
				w.shortstr(msg.routingKey)
			})
			ch.conn.send(appendContent(buf, ch.id, msg, ch.conn.frameMax))
		}
		for _, q := range qs {
			if !q.enqueue(msg) {
				accepted = false
			}
			q.dispatch()
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
