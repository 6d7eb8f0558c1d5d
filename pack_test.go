package main

// Packs: several browser messages in one AMQP message, and line offsets
// inside them.

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"testing"

	"github.com/gorilla/websocket"
	amqp "github.com/rabbitmq/amqp091-go"
)

func TestPackRoundTrip(t *testing.T) {
	msgs := []outgoing{
		{id: "p-1", room: "r", body: []byte("one"), received: 1},
		{id: "p-2", room: "r", body: []byte(""), received: 1 << 62},
		{id: "p-3", room: "r", body: bytes.Repeat([]byte("é"), 300), received: 3},
	}
	got, err := unpack(appendPack(nil, msgs))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(msgs) {
		t.Fatalf("%d messages back, want %d", len(got), len(msgs))
	}
	for i, m := range msgs {
		if got[i].id != m.id || got[i].received != m.received || !bytes.Equal(got[i].body, m.body) {
			t.Errorf("message %d: %+v, want %+v", i, got[i], m)
		}
	}
}

// A pack that does not parse is refused whole, whatever is wrong with it.
func TestMalformedPacksAreRefused(t *testing.T) {
	good := appendPack(nil, []outgoing{{id: "p-1", body: []byte("hello"), received: 5}})
	many := appendPack(nil, slices.Repeat([]outgoing{{id: "p-1", body: []byte("x")}}, packSlots+1))
	for name, b := range map[string][]byte{
		"empty":             nil,
		"cut in the id":     good[:2],
		"cut in the body":   good[:len(good)-1],
		"length past end":   {0x05, 'a'},
		"varint overflow":   bytes.Repeat([]byte{0xff}, 11),
		"too many messages": many,
	} {
		if _, err := unpack(b); err == nil {
			t.Errorf("%s: unpacked", name)
		}
	}
}

// packs keeps the order, and bounds a pack in messages and in bytes.
func TestPacksAreBounded(t *testing.T) {
	var msgs []outgoing
	for i := range 600 {
		msgs = append(msgs, outgoing{id: fmt.Sprint(i), body: make([]byte, 100)})
	}
	big := outgoing{id: "big", body: make([]byte, packBytes)}
	msgs = append(msgs, big, big)
	var sizes []int
	var order []string
	for _, g := range packs(msgs) {
		sizes = append(sizes, len(g))
		for _, m := range g {
			order = append(order, m.id)
		}
	}
	if want := []int{packSlots, packSlots, 600 - 2*packSlots, 1, 1}; !slices.Equal(sizes, want) {
		t.Errorf("pack sizes %v, want %v", sizes, want)
	}
	for i := range 600 {
		if order[i] != fmt.Sprint(i) {
			t.Fatalf("order changed at %d: %s", i, order[i])
		}
	}
}

// Messages that wait for the broker together go out in packs, one room
// to a pack; every browser gets each line once and in order, at
// consecutive offsets, and a browser that resumes from the middle of a
// pack gets the rest of it and no more, from the cache and from the
// stream.
func TestPackedLinesReachEveryBrowserOnce(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		p, url := viaProxy(t, broker.url)
		tb := startBridge(t, testAMQPConfig(url, exchange), testWSConfig())
		talker := tb.dialV1(t, room("pk", "history", "0"))
		talker.untilReady(t)
		other := tb.dialV1(t, room("pk2", "history", "0"))
		other.untilReady(t)
		raw, _, err := websocket.DefaultDialer.Dial(tb.wsURL+"?room=pk", nil) // raw mode, in room pk
		must(t, err)
		t.Cleanup(func() { raw.Close() })

		// The link is cut: what the browsers send waits in the outbox,
		// and goes out as one batch when it is back.
		p.cut()
		waitHealth(t, tb, http.StatusServiceUnavailable)
		const n = 12
		for i := range n {
			must(t, talker.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "pk:%d", i)))
			must(t, other.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "pk2:%d", i)))
		}
		poll(t, "the outbox holds them all", func() bool { return len(tb.amqp.outbox) == 2*n })
		p.restore()

		var got []string
		var offsets []int64
		for range n {
			line, offset := talker.message(t)
			got, offsets = append(got, line), append(offsets, offset)
		}
		for i := range n {
			if want := fmt.Sprint("pk:", i); got[i] != want {
				t.Fatalf("line %d: %q, want %q", i, got[i], want)
			}
			if i > 0 && offsets[i] != offsets[i-1]+1 {
				t.Fatalf("offsets %v: not one pack", offsets)
			}
		}
		if got, _ := other.message(t); got != "pk2:0" {
			t.Fatalf("the other room: %q, want pk2:0", got)
		}
		checkStreams(t, "raw browser", receive(t, raw, n), map[string]int{"pk": n})

		// On the stream: one AMQP message a room, in packs.
		conn := dialURL(t, broker.url)
		ch := openChannel(t, conn)
		must(t, ch.Qos(10, 0, false))
		d, err := ch.Consume(exchange, "", false, false, false, false, amqp.Table{"x-stream-offset": streamOffsetOf(offsets[0])})
		must(t, err)
		if m := next(t, d); m.ContentType != packContentType || m.RoutingKey != "pk" {
			t.Fatalf("on the stream: %q to %q, want a pack to pk", m.ContentType, m.RoutingKey)
		}

		// Resumes from the middle of the pack, on this bridge (from its
		// cache) and on one whose cache keeps two lines (from the stream).
		small := testWSConfig()
		small.History, small.HistoryMax = 1, 2
		for name, b := range map[string]*testBridge{"cache": tb, "stream": startBridge(t, testAMQPConfig(broker.url, exchange), small)} {
			back := b.dialV1(t, room("pk", "since", fmt.Sprint(offsets[4])))
			resumed, _, gap, ready := back.untilReady(t)
			if want := got[5:]; gap || !slices.Equal(resumed, want) || ready != offsets[n-1] {
				t.Errorf("resume from the %s since %d: %q gap=%v ready=%d, want %q, no gap, ready %d", name, offsets[4], resumed, gap, ready, want, offsets[n-1])
			}
		}
	})
}

// A pack published again (a lost confirm) shows once, as its messages do
// one by one: each carries its own id.
func TestRepublishedPackShowsOnce(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		tb := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		c := tb.dialV1(t, room("rp", "history", "0"))
		c.untilReady(t)
		conn := dialURL(t, broker.url)
		pub := openChannel(t, conn)
		pack := amqp.Publishing{AppId: "wsamqp", ContentType: packContentType, Body: appendPack(nil, []outgoing{
			{id: "other-1", body: []byte("a")}, {id: "other-2", body: []byte("b")},
		})}
		must(t, pub.Publish(exchange, "rp", false, false, pack))
		must(t, pub.Publish(exchange, "rp", false, false, pack))
		must(t, pub.Publish(exchange, "rp", false, false, amqp.Publishing{ContentType: packContentType, Body: []byte("\xffjunk")}))
		must(t, pub.Publish(exchange, "rp", false, false, amqp.Publishing{Body: []byte("c")}))
		var got []string
		for range 3 {
			line, _ := c.message(t)
			got = append(got, line)
		}
		if want := []string{"a", "b", "c"}; !slices.Equal(got, want) {
			t.Fatalf("%q, want %q: the copy once, the malformed pack dropped", got, want)
		}
		poll(t, "the malformed pack is counted", func() bool {
			return scrape(t, tb.server.URL)[`wsamqp_broker_messages_dropped_total{reason="malformed"}`] == 1
		})
	})
}
