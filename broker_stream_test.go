package main

// Streams, held to RabbitMQ's behaviour: the same test bodies run against
// the embedded broker and RabbitMQ.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// testStream declares a stream of the test's own, deleted after the test.
func testStream(t *testing.T, broker testBroker, args amqp.Table) (*amqp.Channel, string) {
	t.Helper()
	conn := dialURL(t, broker.url)
	ch := openChannel(t, conn)
	b := make([]byte, 6)
	rand.Read(b)
	name := "wsamqp-test-stream-" + hex.EncodeToString(b)
	all := amqp.Table{"x-queue-type": "stream"}
	for k, v := range args {
		all[k] = v
	}
	if _, err := ch.QueueDeclare(name, true, false, false, false, all); err != nil {
		t.Fatalf("declare stream: %v", err)
	}
	t.Cleanup(func() {
		if c, err := amqp.Dial(broker.url); err == nil {
			if ch, err := c.Channel(); err == nil {
				ch.QueueDelete(name, false, false, false)
			}
			c.Close()
		}
	})
	return ch, name
}

// publishAll publishes bodies to the queue and waits for their confirms.
func publishAll(t *testing.T, ch *amqp.Channel, queue string, bodies ...string) {
	t.Helper()
	must(t, ch.Confirm(false))
	for _, body := range bodies {
		dc, err := ch.PublishWithDeferredConfirm("", queue, false, false, amqp.Publishing{Body: []byte(body)})
		must(t, err)
		if !dc.Wait() {
			t.Fatalf("publish %q nacked", body)
		}
	}
}

// readStream consumes the stream from offset and returns the next n
// messages as "body@offset", acknowledging each.
func readStream(t *testing.T, broker testBroker, queue string, offset any, n int) []string {
	t.Helper()
	ch := openChannel(t, dialURL(t, broker.url))
	must(t, ch.Qos(2, 0, false)) // less than n: acknowledgements give the credit back
	args := amqp.Table{}
	if offset != nil {
		args["x-stream-offset"] = offset
	}
	deliveries, err := ch.Consume(queue, "", false, false, false, false, args)
	must(t, err)
	var got []string
	for range n {
		d := next(t, deliveries)
		if d.Redelivered {
			t.Errorf("%s marked redelivered", d.Body)
		}
		got = append(got, fmt.Sprintf("%s@%v", d.Body, d.Headers["x-stream-offset"]))
		must(t, d.Ack(false))
	}
	return got
}

func TestStreamOffsets(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		ch, q := testStream(t, broker, nil)
		before := time.Now().Add(-time.Second)
		publishAll(t, ch, q, "m0", "m1", "m2", "m3", "m4")
		all := []string{"m0@0", "m1@1", "m2@2", "m3@3", "m4@4"}
		for _, tc := range []struct {
			offset any
			want   []string
		}{
			{"first", all},
			{int64(2), all[2:]},
			{int32(3), all[3:]},
			{"last", all[4:]},
			{before, all},
			{"1h", all},
		} {
			if got := readStream(t, broker, q, tc.offset, len(tc.want)); !slices.Equal(got, tc.want) {
				t.Errorf("from %v: %q, want %q", tc.offset, got, tc.want)
			}
		}
		// "next", the default, and an offset past the end wait for what comes.
		for _, offset := range []any{nil, "next", int64(5)} {
			c := openChannel(t, dialURL(t, broker.url))
			must(t, c.Qos(10, 0, false))
			args := amqp.Table{}
			if offset != nil {
				args["x-stream-offset"] = offset
			}
			d, err := c.Consume(q, "", false, false, false, false, args)
			must(t, err)
			t.Cleanup(func() { c.Close() })
			defer func(d <-chan amqp.Delivery, offset any) {
				m := next(t, d)
				if got := fmt.Sprintf("%s@%v", m.Body, m.Headers["x-stream-offset"]); got != "m5@5" {
					t.Errorf("from %v: %q, want m5@5", offset, got)
				}
			}(d, offset)
		}
		publishAll(t, ch, q, "m5")
	})
}

func TestStreamRefusesWhatRabbitMQRefuses(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		conn := dialURL(t, broker.url)
		stream := amqp.Table{"x-queue-type": "stream"}
		for _, tc := range []struct {
			name                           string
			durable, autoDelete, exclusive bool
			args                           amqp.Table
		}{
			{"non-durable", false, false, false, stream},
			{"auto-delete", true, true, false, stream},
			{"exclusive", true, false, true, stream},
			{"x-max-length", true, false, false, amqp.Table{"x-queue-type": "stream", "x-max-length": int32(5)}},
		} {
			_, err := openChannel(t, conn).QueueDeclare("wsamqp-test-refused-"+tc.name, tc.durable, tc.autoDelete, tc.exclusive, false, tc.args)
			if amqpCode(err) != amqp.PreconditionFailed {
				t.Errorf("%s stream: %v, want 406", tc.name, err)
			}
		}
		ch, q := testStream(t, broker, amqp.Table{"x-max-length-bytes": int64(1 << 20)})
		if _, err := ch.QueueDeclare(q, true, false, false, false, stream); amqpCode(err) != amqp.PreconditionFailed {
			t.Errorf("redeclare with other arguments: %v, want 406 inequivalent arg", err)
		}
		c := dialURL(t, broker.url)
		if _, _, err := openChannel(t, c).Get(q, false); amqpCode(err) != amqp.NotImplemented {
			t.Errorf("basic.get: %v, want 540", err)
		}
		c = dialURL(t, broker.url)
		if _, err := openChannel(t, c).Consume(q, "", false, false, false, false, nil); amqpCode(err) != amqp.PreconditionFailed {
			t.Errorf("consume without a prefetch: %v, want 406", err)
		}
		c = dialURL(t, broker.url)
		noack := openChannel(t, c)
		must(t, noack.Qos(10, 0, false))
		if _, err := noack.Consume(q, "", true, false, false, false, nil); amqpCode(err) != amqp.NotImplemented {
			t.Errorf("consume with automatic acknowledgement: %v, want 540", err)
		}
	})
}

// Retention by bytes drops the oldest messages: reading from "first"
// starts after them, and an offset that is gone starts at the first kept.
func TestStreamRetention(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		ch, q := testStream(t, broker, amqp.Table{"x-max-length-bytes": int64(20_000), "x-stream-max-segment-size-bytes": int32(5_000)})
		body := string(make([]byte, 1000))
		var bodies []string
		for i := range 100 {
			bodies = append(bodies, fmt.Sprintf("%03d%s", i, body))
		}
		publishAll(t, ch, q, bodies...)
		var n, from0 int
		fmt.Sscanf(readStream(t, broker, q, "first", 1)[0], "%03d", &n)
		if n == 0 {
			t.Fatalf("after 100 KB into a 20 KB stream the first message kept is still message 0")
		}
		// RabbitMQ applies retention in the background, so the first kept
		// may move on between two reads, never back.
		fmt.Sscanf(readStream(t, broker, q, int64(0), 1)[0], "%03d", &from0)
		if from0 < n {
			t.Errorf("from offset 0 (gone): message %03d, want the first kept (%03d) or later", from0, n)
		}
		t.Logf("%s: the first message kept is %03d", broker.name, n)
	})
}
