package main

// AMQP channels of the embedded broker: frames dispatched to them,
// deliveries, acknowledgements and publishing.

import (
	"encoding/binary"
	"errors"
	"io"
	"time"
)

// brokerChannel is one AMQP channel of a connection. All of its fields are
// guarded by broker.mu.
type brokerChannel struct {
	id               uint16
	conn             *brokerConn
	closing          bool // channel.close sent; waiting for close-ok
	active           bool // channel.flow
	prefetch         int  // basic.qos global=true: shared by the channel's consumers; 0 no limit
	consumerPrefetch int  // basic.qos global=false: each new consumer's own limit; 0 no limit
	consumers        map[string]*consumer
	unacked          []delivery // in delivery tag order
	nextTag          uint64
	confirm          bool
	published        uint64 // publish sequence number in confirm mode
	lastQueue        string // the queue an empty queue name stands for
	incoming         *incoming

	// In a transaction (tx.select), publishes and acknowledgements wait
	// here for tx.commit; their bytes count in the broker's budget.
	tx        bool
	txPublish []*incoming
	txSettle  []settlement
}

// delivery is a message delivered and not yet acknowledged.
type delivery struct {
	tag      uint64
	msg      *message
	queue    *queue
	consumer *consumer // nil for basic.get
	deaths   int
}

// settlement is a basic.ack, basic.nack or basic.reject held back by a
// transaction.
type settlement struct {
	m                 method
	tag               uint64
	multiple, requeue bool
}

// incoming is a message being received: its basic.publish arrived, its
// header and body frames are on their way.
type incoming struct {
	msg       message
	mandatory bool
	size      uint64
	haveHead  bool
	deadline  time.Time // when the content must have arrived whole
	refused   bool      // the broker is over its memory budget: the body is read and dropped
	received  uint64    // body bytes read, kept or not
}

// canTake reports whether the channel may receive another delivery.
func (ch *brokerChannel) canTake() bool {
	return ch.active && !ch.closing &&
		(ch.prefetch == 0 || len(ch.unacked) < ch.prefetch) && !ch.conn.pendingFull()
}

// deliver sends r to consumer c as basic.deliver.
func (ch *brokerChannel) deliver(c *consumer, q *queue, r ready) {
	ch.nextTag++
	tag := ch.nextTag
	if c.noAck {
		ch.conn.broker.held -= r.msg.size() // it leaves the broker now
	} else {
		ch.unacked = append(ch.unacked, delivery{tag: tag, msg: r.msg, queue: q, consumer: c, deaths: r.deaths})
		c.unacked++
	}
	buf := appendMethod(nil, ch.id, basicDeliver, func(w *wireWriter) {
		w.shortstr(c.tag)
		w.longlong(tag)
		w.bit(r.redelivered)
		w.shortstr(r.msg.exchange)
		w.shortstr(r.msg.routingKey)
	})
	ch.conn.send(appendContent(buf, ch.id, r.msg, ch.conn.frameMax))
}

// redispatch offers messages to this channel's consumers again, once the
// channel can take more.
func (ch *brokerChannel) redispatch() {
	for _, c := range ch.consumers {
		ch.conn.broker.dispatch(c.queue)
	}
}

// close cancels the channel's consumers, requeues its unacknowledged
// deliveries and drops what a transaction or an unfinished publish held.
// broker.mu is held.
func (ch *brokerChannel) close() {
	b := ch.conn.broker
	for _, c := range ch.consumers {
		b.removeConsumer(c)
	}
	ch.consumers = nil
	ch.dropIncoming()
	for _, in := range ch.txPublish {
		b.held -= int64(len(in.msg.body))
	}
	ch.txPublish, ch.txSettle = nil, nil
	unacked := ch.unacked
	ch.unacked = nil
	ch.requeue(unacked)
}

// dropIncoming forgets an unfinished publish and gives back its bytes.
func (ch *brokerChannel) dropIncoming() {
	if ch.incoming != nil {
		ch.conn.broker.held -= int64(len(ch.incoming.msg.body))
		ch.incoming = nil
		ch.conn.partial--
	}
}

// requeue returns deliveries to their queues and dispatches them again.
// A delivery whose queue is gone is dropped.
func (ch *brokerChannel) requeue(ds []delivery) {
	b := ch.conn.broker
	byQueue := map[*queue][]*message{}
	var order []*queue
	for _, d := range ds {
		if d.consumer != nil {
			d.consumer.unacked--
		}
		if d.queue.stream != nil {
			continue // a stream keeps its messages: nothing to put back
		}
		if b.queues[d.queue.name] != d.queue {
			b.held -= d.msg.size()
			continue
		}
		if _, ok := byQueue[d.queue]; !ok {
			order = append(order, d.queue)
		}
		byQueue[d.queue] = append(byQueue[d.queue], d.msg)
	}
	for _, q := range order {
		b.requeue(q, byQueue[q])
	}
	for _, q := range order {
		b.dispatch(q)
	}
}

// handleFrame handles one frame after the handshake. A channel error
// closes the channel and returns nil; a connection error is returned.
// broker.mu is held.
func (c *brokerConn) handleFrame(f frame) error {
	if c.closing {
		if f.typ == frameMethod && f.channel == 0 && len(f.payload) >= 4 &&
			method(binary.BigEndian.Uint32(f.payload)) == connectionCloseOk {
			return io.EOF
		}
		return nil // everything else is ignored until close-ok
	}
	if f.typ == frameHeartbeat {
		if f.channel != 0 {
			return connectionError(replyFrameError, 0, "heartbeat on channel %d", f.channel)
		}
		return nil
	}
	if f.channel == 0 {
		if f.typ != frameMethod {
			return connectionError(replyUnexpectedFrame, 0, "content frame on channel 0")
		}
		return c.handleConnectionMethod(f.payload)
	}
	ch := c.channels[f.channel]
	var err *amqpError
	switch {
	case ch == nil && int(f.channel) > c.channelMax:
		err = connectionError(replyNotAllowed, channelOpen, "channel %d is over the negotiated channel_max %d", f.channel, c.channelMax)
	case ch == nil && f.typ == frameMethod:
		err = c.openChannel(f.channel, f.payload)
	case ch == nil:
		err = connectionError(replyChannelError, 0, "channel %d is not open", f.channel)
	case ch.closing:
		if f.typ == frameMethod && len(f.payload) >= 4 {
			if m := method(binary.BigEndian.Uint32(f.payload)); m == channelCloseOk || m == channelClose {
				delete(c.channels, ch.id)
				if m == channelClose {
					c.sendMethod(ch.id, channelCloseOk, nil)
				}
			}
		}
	case f.typ == frameMethod:
		err = ch.handleMethod(f.payload)
	case f.typ == frameHeader || f.typ == frameBody:
		err = ch.handleContent(f)
	default:
		err = connectionError(replyFrameError, 0, "unknown frame type %d", f.typ)
	}
	if err == nil {
		return nil
	}
	if err.connection {
		return err
	}
	// A channel error: close the channel, keep the connection.
	ch = c.channels[f.channel]
	ch.close()
	ch.closing = true
	c.sendMethod(ch.id, channelClose, func(w *wireWriter) {
		w.short(err.code)
		w.shortstr(err.text)
		w.short(err.cause.class())
		w.short(err.cause.id())
	})
	return nil
}

// errClientClosed ends a connection that the client closed: the broker has
// answered close-ok and leaves the socket for the client to close first.
var errClientClosed = errors.New("client closed the connection")

// handleConnectionMethod handles methods on channel 0 after the handshake.
func (c *brokerConn) handleConnectionMethod(payload []byte) error {
	r := &wireReader{b: payload}
	m := method(r.long())
	switch m {
	case connectionClose:
		c.sendMethod(0, connectionCloseOk, nil)
		return errClientClosed
	case connectionCloseOk:
		return io.EOF
	}
	return connectionError(replyCommandInvalid, m, "unexpected method %d.%d on channel 0", m.class(), m.id())
}

// openChannel handles the first frame on a channel that is not open,
// which must be channel.open.
func (c *brokerConn) openChannel(id uint16, payload []byte) *amqpError {
	r := &wireReader{b: payload}
	switch m := method(r.long()); m {
	case channelOpen:
	case channelClose:
		// The client closed the channel while the broker's own
		// channel.close crossed it on the wire, and the client's close-ok
		// went first: answer, as RabbitMQ does, rather than fail the
		// connection.
		c.sendMethod(id, channelCloseOk, nil)
		return nil
	case channelCloseOk:
		return nil
	default:
		return connectionError(replyChannelError, m, "channel %d is not open", id)
	}
	c.channels[id] = &brokerChannel{id: id, conn: c, active: true, consumers: make(map[string]*consumer)}
	c.sendMethod(id, channelOpenOk, func(w *wireWriter) { w.longstr(nil) })
	return nil
}
