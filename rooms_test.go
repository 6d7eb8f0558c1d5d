package main

// Rooms, history and resume over wsamqp.v1, against every broker.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	amqp "github.com/rabbitmq/amqp091-go"
)

// v1Line is one line of a wsamqp.v1 frame.
type v1Line struct {
	Offset *int64          `json:"offset"`
	Data   json.RawMessage `json:"data"`
	Text   *string         `json:"text"`
	Event  string          `json:"event"`
	Room   string          `json:"room"`
}

// payload returns what a message line carries, as sent.
func (l v1Line) payload() string {
	if l.Text != nil {
		return *l.Text
	}
	return string(l.Data)
}

// dialV1 opens a wsamqp.v1 connection to tb with query (room, since,
// history).
func (tb *testBridge) dialV1(t *testing.T, query url.Values) *v1Conn {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{ProtocolV1}}
	conn, _, err := d.Dial(tb.wsURL+"?"+query.Encode(), nil)
	if err != nil {
		t.Fatalf("dial %s?%s: %v", tb.wsURL, query.Encode(), err)
	}
	t.Cleanup(func() { conn.Close() })
	if conn.Subprotocol() != ProtocolV1 {
		t.Fatalf("subprotocol %q, want %s", conn.Subprotocol(), ProtocolV1)
	}
	return &v1Conn{Conn: conn}
}

// v1Conn reads a wsamqp.v1 connection line by line.
type v1Conn struct {
	*websocket.Conn
	pending []v1Line
}

// next returns the next line, failing the test if none comes.
func (c *v1Conn) next(t testing.TB) v1Line {
	t.Helper()
	for len(c.pending) == 0 {
		c.SetReadDeadline(time.Now().Add(waitFor))
		_, frame, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		for l := range strings.SplitSeq(string(frame), "\n") {
			var line v1Line
			if err := json.Unmarshal([]byte(l), &line); err != nil {
				t.Fatalf("line %q: %v", l, err)
			}
			c.pending = append(c.pending, line)
		}
	}
	l := c.pending[0]
	c.pending = c.pending[1:]
	return l
}

// untilReady returns the payloads before the ready event, whether a gap
// came first, and the ready event's offset.
func (c *v1Conn) untilReady(t testing.TB) (payloads []string, offsets []int64, gap bool, ready int64) {
	t.Helper()
	for i := 0; ; i++ {
		l := c.next(t)
		switch {
		case l.Event == "gap":
			if i != 0 {
				t.Fatalf("gap event as line %d, want it first", i)
			}
			gap = true
		case l.Event == "ready":
			return payloads, offsets, gap, *l.Offset
		case l.Offset != nil:
			payloads = append(payloads, l.payload())
			offsets = append(offsets, *l.Offset)
		default:
			t.Fatalf("unexpected line %+v", l)
		}
	}
}

// message returns the next message line's payload and offset.
func (c *v1Conn) message(t testing.TB) (string, int64) {
	t.Helper()
	l := c.next(t)
	if l.Offset == nil || l.Event != "" {
		t.Fatalf("got %+v, want a message", l)
	}
	return l.payload(), *l.Offset
}

// room returns query values for a room, with more key/value pairs.
func room(name string, kv ...string) url.Values {
	q := url.Values{"room": {name}}
	for i := 0; i+1 < len(kv); i += 2 {
		q.Set(kv[i], kv[i+1])
	}
	return q
}

func TestRoomsStayApart(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
		red, blue := tb.dialV1(t, room("red", "history", "0")), tb.dialV1(t, room("blue", "history", "0"))
		red.untilReady(t)
		blue.untilReady(t)
		rawRed, _, err := websocket.DefaultDialer.Dial(tb.wsURL+"?room=red", nil)
		must(t, err)
		defer rawRed.Close()
		lobby := tb.dial(t) // raw, no room: the lobby

		must(t, red.WriteMessage(websocket.TextMessage, []byte("to red")))
		must(t, blue.WriteMessage(websocket.TextMessage, []byte(`{"to":"blue"}`)))
		must(t, lobby.WriteMessage(websocket.TextMessage, []byte("to lobby")))
		if got, _ := red.message(t); got != "to red" {
			t.Errorf("red got %q", got)
		}
		if got, _ := blue.message(t); got != `{"to":"blue"}` {
			t.Errorf("blue got %q, want the JSON as data", got)
		}
		if got := receive(t, rawRed, 1)[0]; got != "to red" {
			t.Errorf("raw red got %q", got)
		}
		if got := receive(t, lobby, 1)[0]; got != "to lobby" {
			t.Errorf("lobby got %q", got)
		}
		// Nothing else arrives anywhere: one more line each proves it.
		must(t, red.WriteMessage(websocket.TextMessage, []byte("again")))
		must(t, blue.WriteMessage(websocket.TextMessage, []byte("again")))
		if got, _ := red.message(t); got != "again" {
			t.Errorf("red then got %q", got)
		}
		if got, _ := blue.message(t); got != "again" {
			t.Errorf("blue then got %q", got)
		}
	})
}

func TestHistoryOnJoin(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
		talker := tb.dialV1(t, room("hist", "history", "0"))
		talker.untilReady(t)
		other := tb.dialV1(t, room("elsewhere", "history", "0"))
		other.untilReady(t)
		var offsets []int64
		for i := range 10 {
			must(t, talker.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "h:%d", i)))
			must(t, other.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "x:%d", i)))
			_, offset := talker.message(t)
			other.message(t)
			offsets = append(offsets, offset)
		}
		late := tb.dialV1(t, room("hist", "history", "4"))
		got, _, gap, ready := late.untilReady(t)
		if want := []string{"h:6", "h:7", "h:8", "h:9"}; !slices.Equal(got, want) || gap || ready != offsets[9] {
			t.Fatalf("history=4: %q gap=%v ready=%d, want %q, no gap, ready %d", got, gap, ready, want, offsets[9])
		}
		must(t, talker.WriteMessage(websocket.TextMessage, []byte("live")))
		if got, _ := late.message(t); got != "live" {
			t.Fatalf("after history: %q, want live", got)
		}
		// history=0 and a room never used: nothing, ready -1.
		empty := tb.dialV1(t, room("quiet", "history", "50"))
		if got, _, _, ready := empty.untilReady(t); len(got) != 0 || ready != -1 {
			t.Fatalf("empty room: %q ready=%d", got, ready)
		}
	})
}

// resumeAfterAbsence has a browser leave room "r" after one line, sends k
// lines to it (and lines to another room) while it is away, and brings it
// back with since through dialBack: it must get exactly those k, then live
// lines, no gap and no duplicate at the seam.
func resumeAfterAbsence(t *testing.T, here *testBridge, dialBack func(url.Values) *v1Conn) {
	t.Helper()
	away := here.dialV1(t, room("r", "history", "0"))
	away.untilReady(t)
	talker := here.dialV1(t, room("r", "history", "0"))
	talker.untilReady(t)
	noise := here.dialV1(t, room("noise", "history", "0"))
	noise.untilReady(t)
	must(t, talker.WriteMessage(websocket.TextMessage, []byte("before")))
	_, last := away.message(t)
	talker.message(t)
	away.Close()

	const k = 7
	for i := range k {
		must(t, talker.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "missed:%d", i)))
		must(t, noise.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "noise:%d", i)))
		talker.message(t)
		noise.message(t)
	}
	back := dialBack(room("r", "since", fmt.Sprint(last)))
	got, offsets, gap, ready := back.untilReady(t)
	if gap || (len(offsets) > 0 && ready != offsets[len(offsets)-1]) || (len(offsets) == 0 && ready != last) {
		t.Fatalf("resume since %d: %q gap=%v ready=%d", last, got, gap, ready)
	}
	// What the process it came back to had not read yet when it joined
	// follows live, after the ready event.
	for len(got) < k {
		line, _ := back.message(t)
		got = append(got, line)
	}
	var want []string
	for i := range k {
		want = append(want, fmt.Sprint("missed:", i))
	}
	if !slices.Equal(got, want) {
		t.Fatalf("resume since %d: %q, want %q", last, got, want)
	}
	must(t, talker.WriteMessage(websocket.TextMessage, []byte("live")))
	if got, offset := back.message(t); got != "live" || offset <= ready {
		t.Fatalf("after resuming: %q at %d, want live after %d", got, offset, ready)
	}
}

func TestResumeAfterDisconnect(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
		resumeAfterAbsence(t, tb, func(q url.Values) *v1Conn { return tb.dialV1(t, q) })
	})
}

// A browser comes back to another bridge process: offsets are the
// stream's, the same everywhere, so no sticky sessions are needed.
func TestResumeOnAnotherBridge(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		one := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		two := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		resumeAfterAbsence(t, one, func(q url.Values) *v1Conn { return two.dialV1(t, q) })
	})
}

// When the cache does not go back far enough, what was missed is read
// from the stream.
func TestResumeFromTheStream(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		cfg := testWSConfig()
		cfg.History, cfg.HistoryMax = 1, 2 // the cache keeps two lines a room
		tb := startBridge(t, testAMQPConfig(broker.url, exchange), cfg)
		resumeAfterAbsence(t, tb, func(q url.Values) *v1Conn { return tb.dialV1(t, q) })
	})
}

// A resume from an offset the stream no longer holds says so first.
func TestGapWhenTheStreamNoLongerHoldsSince(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		amqpCfg := testAMQPConfig(broker.url, exchange)
		amqpCfg.StreamBytes, amqpCfg.SegmentBytes = 20_000, 5_000
		wsCfg := testWSConfig()
		wsCfg.HistoryMax, wsCfg.History = 2, 0 // so that the resume reads the stream
		wsCfg.Rate = 0
		tb := startBridge(t, amqpCfg, wsCfg)
		talker := tb.dialV1(t, room("g", "history", "0"))
		talker.untilReady(t)
		must(t, talker.WriteMessage(websocket.TextMessage, []byte("first")))
		_, first := talker.message(t)
		big := strings.Repeat("x", 1000)
		for i := range 100 { // 100 KB into a 20 KB stream
			must(t, talker.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "%d:%s", i, big)))
			talker.message(t)
		}
		back := tb.dialV1(t, room("g", "since", fmt.Sprint(first)))
		got, _, gap, _ := back.untilReady(t)
		if !gap {
			t.Fatalf("resume from %d after retention dropped it: no gap event (%d lines)", first, len(got))
		}
		if len(got) == 0 || !strings.HasPrefix(got[len(got)-1], "99:") {
			t.Fatalf("after the gap, %d lines ending %.8q, want the kept ones up to 99", len(got), got)
		}
	})
}

func TestBadJoinIsRefusedBeforeTheUpgrade(t *testing.T) {
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
	for _, q := range []string{"room=UPPER", "room=-x", "room=" + strings.Repeat("a", 65), "room=a/b", "since=-1", "since=x", "history=-2", "history=1e3"} {
		resp, err := http.Get(strings.Replace(tb.wsURL, "ws", "http", 1) + "?" + q)
		must(t, err)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("?%s: %d, want 400", q, resp.StatusCode)
		}
	}
}

// A line published twice (a lost confirm) reaches a resuming browser
// once, from the cache and from the stream.
func TestRepublishedLineReachesOnce(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		for _, historyMax := range []int{1000, 1} {
			cfg := testWSConfig()
			cfg.HistoryMax, cfg.History = historyMax, min(historyMax, 50)
			tb := startBridge(t, testAMQPConfig(broker.url, exchange), cfg)
			c := tb.dialV1(t, room("dup", "history", "0"))
			c.untilReady(t)
			must(t, c.WriteMessage(websocket.TextMessage, []byte("mark")))
			_, mark := c.message(t)
			must(t, c.WriteMessage(websocket.TextMessage, []byte("once")))
			c.message(t)
			// The bridge's own id for "once", published again by hand.
			conn := dialURL(t, broker.url)
			ch := openChannel(t, conn)
			must(t, ch.Qos(10, 0, false))
			d, err := ch.Consume(exchange, "", false, false, false, false, amqp.Table{"x-stream-offset": streamOffsetOf(mark) + 1})
			must(t, err)
			once := next(t, d)
			pub := openChannel(t, conn)
			must(t, pub.Publish(exchange, "dup", false, false, amqp.Publishing{AppId: once.AppId, MessageId: once.MessageId, Body: once.Body}))
			must(t, c.WriteMessage(websocket.TextMessage, []byte("after")))
			if got, _ := c.message(t); got != "after" {
				t.Fatalf("live, history-max %d: %q after once, want after", historyMax, got)
			}
			back := tb.dialV1(t, room("dup", "since", fmt.Sprint(mark)))
			if got, _, _, _ := back.untilReady(t); !slices.Equal(got, []string{"once", "after"}) {
				t.Fatalf("resume, history-max %d: %q, want once, after", historyMax, got)
			}
			exchange = testExchange(t, broker) // a fresh stream for the second round
		}
	})
}

// A bridge killed with SIGKILL and started again: a browser that comes
// back to it with since gets exactly what was sent meanwhile (here by
// another producer, straight to the exchange, since no bridge was up),
// then live lines. The broker outlives the bridge; the embedded one here
// is the tests' own, served on TCP.
func TestResumeAfterTheBridgeIsKilled(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		args := "-amqp " + broker.url + " -exchange " + exchange + " -stream " + exchange
		first, addr, _ := startProgram(t, args)
		dial := func(addr string, q url.Values) *v1Conn {
			d := websocket.Dialer{Subprotocols: []string{ProtocolV1}}
			conn, _, err := d.Dial("ws://"+addr+"/ws?"+q.Encode(), nil)
			must(t, err)
			t.Cleanup(func() { conn.Close() })
			return &v1Conn{Conn: conn}
		}
		c := dial(addr, room("k", "history", "0"))
		c.untilReady(t)
		must(t, c.WriteMessage(websocket.TextMessage, []byte("before")))
		_, last := c.message(t)

		must(t, first.Process.Kill()) // SIGKILL: no goodbye, no drain
		first.Wait()
		ch := openChannel(t, dialURL(t, broker.url))
		must(t, ch.Confirm(false))
		for i := range 5 {
			dc, err := ch.PublishWithDeferredConfirm(exchange, "k", false, false, amqp.Publishing{Body: fmt.Appendf(nil, "while down:%d", i)})
			must(t, err)
			if !dc.Wait() {
				t.Fatal("publish nacked")
			}
		}

		_, addr, _ = startProgram(t, args)
		back := dial(addr, room("k", "since", fmt.Sprint(last)))
		got, _, gap, _ := back.untilReady(t)
		want := []string{"while down:0", "while down:1", "while down:2", "while down:3", "while down:4"}
		if !slices.Equal(got, want) || gap {
			t.Fatalf("after SIGKILL and a restart: %q gap=%v, want %q", got, gap, want)
		}
		must(t, back.WriteMessage(websocket.TextMessage, []byte("live")))
		if got, _ := back.message(t); got != "live" {
			t.Fatalf("then %q, want live", got)
		}
	})
}
