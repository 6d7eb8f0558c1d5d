package main

// The AMQP plugin's side of the stream: declaring it, finding where it
// ends at start, and reading back what a resuming browser missed.

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// declare opens the session's AMQP channels, declares the topology and
// starts consuming.
//
// The stream is declared passively first: a stream that exists is used as
// it is, whatever arguments it was declared with (a replicated one, say),
// since RabbitMQ refuses a redeclaration with other arguments (406
// inequivalent arg) and closes the channel. Only a missing stream is
// declared, with this process's retention.
func (p *AMQPPlugin) declare(s *session) error {
	cfg := p.cfg
	var err error
	if s.consumer, err = s.conn.Channel(); err != nil {
		return fmt.Errorf("channel.open: %w", err)
	}
	if s.publisher, err = s.conn.Channel(); err != nil {
		return fmt.Errorf("channel.open: %w", err)
	}
	if err := s.publisher.Confirm(false); err != nil {
		return fmt.Errorf("confirm.select: %w", err)
	}
	if err := s.consumer.ExchangeDeclare(cfg.Exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("exchange.declare %s: %w", cfg.Exchange, err)
	}
	if _, err := s.consumer.QueueDeclarePassive(cfg.Stream, true, false, false, false, nil); err != nil {
		var ae *amqp.Error
		if !errors.As(err, &ae) || ae.Code != amqp.NotFound {
			return fmt.Errorf("queue.declare %s (passive): %w", cfg.Stream, err)
		}
		if s.consumer, err = s.conn.Channel(); err != nil { // the 404 closed the last one
			return fmt.Errorf("channel.open: %w", err)
		}
		args := amqp.Table{
			"x-queue-type":                    "stream",
			"x-max-length-bytes":              cfg.StreamBytes,
			"x-stream-max-segment-size-bytes": cfg.SegmentBytes,
			"x-initial-cluster-size":          int32(cfg.Replicas),
		}
		if cfg.StreamAge != "" {
			args["x-max-age"] = cfg.StreamAge
		}
		if _, err := s.consumer.QueueDeclare(cfg.Stream, true, false, false, false, args); err != nil {
			return fmt.Errorf("queue.declare %s: %w", cfg.Stream, err)
		}
		if p.next >= 0 {
			// The stream was gone (a broker that keeps nothing restarted)
			// and is made anew: its offsets start again, so it is read
			// from its first message; the hub sees the offsets go back.
			p.bus.Log("amqp stream was missing and is declared anew; reading it from its first message", slog.LevelWarn, "stream", cfg.Stream)
			p.next = -1
		}
	}
	if err := s.consumer.QueueBind(cfg.Stream, "", cfg.Exchange, false, nil); err != nil {
		return fmt.Errorf("queue.bind %s: %w", cfg.Stream, err)
	}
	if p.next < 0 {
		if s.lastAtDial, err = p.lastOffset(s); err != nil {
			return err
		}
	}
	if err := s.consumer.Qos(cfg.Prefetch, 0, false); err != nil {
		return fmt.Errorf("basic.qos: %w", err)
	}
	if s.deliveries, err = s.consumer.Consume(cfg.Stream, s.tag, false, false, false, false, amqp.Table{"x-stream-offset": p.startOffset()}); err != nil {
		return fmt.Errorf("basic.consume %s: %w", cfg.Stream, err)
	}
	return nil
}

// lastOffset returns the offset of the stream's last message, or -1 if it
// holds none, by reading from "last" for at most cfg.StreamWait: an empty
// stream (or one whose retention dropped every segment) delivers nothing
// until the next publish, so this never waits without a bound.
func (p *AMQPPlugin) lastOffset(s *session) (int64, error) {
	ch, err := s.conn.Channel()
	if err != nil {
		return -1, fmt.Errorf("channel.open: %w", err)
	}
	defer ch.Close()
	if err := ch.Qos(1, 0, false); err != nil {
		return -1, fmt.Errorf("basic.qos: %w", err)
	}
	d, err := ch.Consume(p.cfg.Stream, "", false, false, false, false, amqp.Table{"x-stream-offset": "last"})
	if err != nil {
		return -1, fmt.Errorf("basic.consume %s (last): %w", p.cfg.Stream, err)
	}
	t := time.NewTimer(p.cfg.StreamWait)
	defer t.Stop()
	select {
	case m, ok := <-d:
		if offset, found := streamOffset(m); ok && found {
			return offset, nil
		}
	case <-t.C:
	}
	return -1, nil
}

// markCaughtUp tells the bus, once, that the consumer has read the stream
// as far as it reached when the plugin started: from now on, what arrives
// is live.
func (p *AMQPPlugin) markCaughtUp() {
	p.caughtUpOnce.Do(func() {
		close(p.caughtUp)
		p.bus.Publish(ChannelCaughtUp)
	})
}

// ReplayRequest asks for the messages of a room between two offsets:
// those after After, through Through. After is the offset of the last
// message the browser has; if the stream no longer holds it, Gap says
// that some may be missing.
type ReplayRequest struct {
	Room     string
	After    int64
	Through  int64
	Before   time.Time // gives up by then
	MaxBytes int64     // past this, the oldest are left out, and Gap is set
}

// ReplayResult answers a ReplayRequest.
type ReplayResult struct {
	Messages []Message
	Gap      bool
}

// replays bounds how many replays read the stream at once: each holds an
// AMQP channel and up to ReplayBytes.
const replays = 8

// replay reads the stream from req.After to req.Through on an AMQP channel
// of its own, keeping the messages of req.Room. It runs on the goroutine
// of the browser that asked, and answers ErrOutboxFull while the broker is
// away.
func (p *AMQPPlugin) replay(req ReplayRequest) (ReplayResult, error) {
	var res ReplayResult
	p.mu.Lock()
	s := p.current
	p.mu.Unlock()
	if s == nil || !p.up.Load() {
		return res, ErrOutboxFull
	}
	select {
	case p.replaying <- struct{}{}:
		defer func() { <-p.replaying }()
	case <-time.After(time.Until(req.Before)):
		return res, fmt.Errorf("amqp: replay of %s: too many replays under way", req.Room)
	}
	ch, err := s.conn.Channel()
	if err != nil {
		return res, fmt.Errorf("replay: channel.open: %w", err)
	}
	defer ch.Close()
	if err := ch.Qos(p.cfg.Prefetch, 0, false); err != nil {
		return res, fmt.Errorf("replay: basic.qos: %w", err)
	}
	d, err := ch.Consume(p.cfg.Stream, "", false, false, false, false, amqp.Table{"x-stream-offset": max(streamOffsetOf(req.After), 0)})
	if err != nil {
		return res, fmt.Errorf("replay: basic.consume %s: %w", p.cfg.Stream, err)
	}
	seen := newDedupe()
	var bytes int64
	first := true
	idle := time.NewTimer(p.cfg.StreamWait)
	defer idle.Stop()
	for {
		select {
		case m, ok := <-d:
			if !ok {
				return res, fmt.Errorf("replay: the AMQP channel closed")
			}
			offset, found := streamOffset(m)
			if !found {
				continue
			}
			if first && req.After >= 0 && offset > streamOffsetOf(req.After) {
				res.Gap = true // the browser's last message is gone: retention dropped it
			}
			first = false
			msgs, _, _ := appendMessages(nil, m, offset, seen, 0) // a malformed pack holds nothing
			for _, msg := range msgs {
				if msg.Offset > req.Through {
					return res, nil
				}
				if msg.Offset <= req.After || msg.Room != req.Room {
					continue
				}
				msg.Body = slices.Clone(msg.Body) // not the whole pack
				res.Messages = append(res.Messages, msg)
				bytes += int64(len(msg.Body))
				for bytes > req.MaxBytes && len(res.Messages) > 0 {
					bytes -= int64(len(res.Messages[0].Body))
					res.Messages = res.Messages[1:]
					res.Gap = true
				}
			}
			m.Ack(false)
			if offset >= streamOffsetOf(req.Through) {
				return res, nil
			}
			idle.Reset(p.cfg.StreamWait)
		case <-idle.C:
			// Nothing more to read: the stream ends before Through (it
			// was trimmed), or holds nothing at all from After on.
			if first && req.After >= 0 {
				res.Gap = true
			}
			return res, nil
		}
	}
}
