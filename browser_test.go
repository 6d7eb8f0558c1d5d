package main

import (
	"bytes"
	"context"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	_ "image/jpeg" // FullScreenshot gives JPEG below quality 100
	"image/png"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
)

// chromePath finds Chromium: $CHROME_PATH, or a chromium or chrome on the
// PATH. The test skips, saying why, when there is none.
func chromePath(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("CHROME_PATH"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("browser test needs Chromium: set CHROME_PATH or install it (apt-get install chromium); .ci/run does")
	return ""
}

// newBrowser starts headless Chromium for the test.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromePath(t)),
		chromedp.NoSandbox, // the tests may run as root
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(640, 720),
	)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	browser, cancel := chromedp.NewContext(alloc)
	t.Cleanup(cancel)
	if err := chromedp.Do(browser); err != nil {
		t.Fatalf("start Chromium: %v", err)
	}
	return browser
}

// chatPage is one browser window on the chat page.
type chatPage struct {
	t    *testing.T
	name string
	ctx  context.Context
}

// openPage opens url in a browser context of its own (its own storage, as
// another person's browser would have) and waits until it is connected.
func openPage(t *testing.T, browser context.Context, name, url string) *chatPage {
	t.Helper()
	p := navigate(t, browser, name, url)
	p.waitState("connected")
	return p
}

// navigate opens url in a browser context of its own.
func navigate(t *testing.T, browser context.Context, name, url string) *chatPage {
	t.Helper()
	ctx, cancel := chromedp.NewContext(browser, chromedp.WithNewBrowserContext())
	t.Cleanup(cancel)
	p := &chatPage{t: t, name: name, ctx: ctx}
	p.do(chromedp.Navigate(url))
	return p
}

// do runs browser actions, failing the test on error.
func (p *chatPage) do(steps ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	if err := chromedp.Do(p.ctx, steps...); err != nil {
		p.t.Fatalf("%s: %v", p.name, err)
	}
}

// waitState waits until the page's status indicator says state.
func (p *chatPage) waitState(state string) {
	p.t.Helper()
	p.do(chromedp.Poll[chromedp.Void](fmt.Sprintf(`document.getElementById("status").dataset.state === %q`, state),
		chromedp.WithPollingTimeout(waitFor)))
}

// chatLine is one line of the page's message log.
type chatLine struct {
	Name string `json:"name"`
	Text string `json:"text"`
}

// waitLines waits until the log holds at least n lines and returns them all.
func (p *chatPage) waitLines(n int) []chatLine {
	p.t.Helper()
	p.do(chromedp.Poll[chromedp.Void](fmt.Sprintf(`document.querySelectorAll("#log li:not(.note)").length >= %d`, n),
		chromedp.WithPollingTimeout(waitFor)))
	lines, err := chromedp.Run(p.ctx, chromedp.Evaluate[[]chatLine](`[...document.querySelectorAll("#log li:not(.note)")].map(li => ({
		name: li.querySelector(".name")?.textContent ?? "",
		text: li.querySelector(".text")?.textContent ?? li.textContent,
	}))`))
	if err != nil {
		p.t.Fatalf("%s: read log: %v", p.name, err)
	}
	return lines
}

// say types a line into the page and sends it with the Enter key.
func (p *chatPage) say(text string) {
	p.t.Helper()
	p.do(chromedp.SendKeys(chromedp.ID("text"), text+kb.Enter))
}

// checkLines fails the test unless got ends with want, in order.
func checkLines(t *testing.T, who string, got []chatLine, want ...chatLine) {
	t.Helper()
	if len(got) < len(want) || !slices.Equal(got[len(got)-len(want):], want) {
		t.Fatalf("%s shows %q, want it to end with %q", who, got, want)
	}
}

func TestBrowserChat(t *testing.T) {
	browser := newBrowser(t)
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())

	a := openPage(t, browser, "window A", tb.server.URL)
	b := openPage(t, browser, "window B", tb.server.URL)
	poll(t, "the hub has both windows", func() bool { return tb.hub.Clients() == 2 })

	// A line typed in A shows up in both windows, with its name, once:
	// the page shows nothing until the server sends it back.
	a.do(chromedp.SendKeys(chromedp.ID("name"), "alice"))
	a.say("hello from A")
	hello := chatLine{"alice", "hello from A"}
	checkLines(t, "A", a.waitLines(1), hello)
	checkLines(t, "B", b.waitLines(1), hello)

	// Each live line tells its journey, hop by hop, on hover (its title)
	// and on a tap.
	title, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector("#log li:not(.note)").title`))
	if err != nil || !regexp.MustCompile(`^browser → bridge -?[0-9.]+ ms · in the bridge -?[0-9.]+ ms · bridge → broker → bridge -?[0-9.]+ ms · bridge → browser -?[0-9.]+ ms · total [0-9.]+ ms$`).MatchString(title) {
		t.Errorf("B's line's journey: %q (%v)", title, err)
	}
	b.do(chromedp.Click(`#log li:not(.note)`))
	if shown, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector("#log li .journey")?.textContent ?? ""`)); err != nil || shown != title {
		t.Errorf("a tap shows %q (%v), want the journey", shown, err)
	}
	b.do(chromedp.Click(`#log li:not(.note)`))

	// The send button works too, and a reply from B reaches A.
	a.do(chromedp.SendKeys(chromedp.ID("text"), "sent with the button"), chromedp.Click(chromedp.ID("send")))
	b.do(chromedp.SendKeys(chromedp.ID("name"), "bob"))
	b.say("hi alice")
	button, reply := chatLine{"alice", "sent with the button"}, chatLine{"bob", "hi alice"}
	checkLines(t, "A", a.waitLines(3), hello, button, reply)
	checkLines(t, "B", b.waitLines(3), hello, button, reply)

	// HTML is shown as text and runs nothing.
	evil := `<img src=x onerror="document.title='pwned'">`
	a.say(evil)
	checkLines(t, "B", b.waitLines(4), chatLine{"alice", evil})
	for _, p := range []*chatPage{a, b} {
		imgs, err := chromedp.Run(p.ctx, chromedp.Evaluate[int](`document.querySelectorAll("#log img").length`))
		if err != nil || imgs != 0 {
			t.Errorf("%s: %d img elements in the log (%v)", p.name, imgs, err)
		}
		if title, _ := chromedp.Run(p.ctx, chromedp.Title()); title != "#lobby · wsamqp chat" {
			t.Errorf("%s: title is %q: the message ran as HTML", p.name, title)
		}
	}

	// Text that is not a JSON chat line, from any AMQP producer, is shown
	// as it came.
	a.do(chromedp.Evaluate[chromedp.Void](`socket.send("plain text, not JSON")`))
	checkLines(t, "B", b.waitLines(5), chatLine{"", "plain text, not JSON"})

	// The server goes away: the pages say so and disable the input; when
	// it comes back they reconnect by themselves and chat works again.
	tb.bus.Stop()
	for _, p := range []*chatPage{a, b} {
		p.waitState("disconnected")
		disabled, err := chromedp.Run(p.ctx, chromedp.Evaluate[bool](`document.getElementById("text").disabled`))
		if err != nil || !disabled {
			t.Errorf("%s: input disabled = %v (%v) while disconnected", p.name, disabled, err)
		}
	}
	if err := tb.bus.Start(); err != nil {
		t.Fatal(err)
	}
	a.waitState("connected")
	b.waitState("connected")
	poll(t, "the hub has both windows again", func() bool { return tb.hub.Clients() == 2 })
	b.say("back again")
	back := chatLine{"bob", "back again"}
	checkLines(t, "A", a.waitLines(6), back)

	// 200 lines sent as fast as the page can send them all arrive, in order.
	a.do(chromedp.Evaluate[chromedp.Void](`for (let i = 0; i < 200; i++) {
		document.getElementById("text").value = "burst " + i;
		document.getElementById("chat").requestSubmit();
	}`))
	got := b.waitLines(6 + 200)
	for i, line := range got[6:] {
		if want := (chatLine{"alice", fmt.Sprint("burst ", i)}); line != want {
			t.Fatalf("B line %d of the burst is %q, want %q", i, line, want)
		}
	}

	// Someone reading back keeps their place when a line arrives.
	b.do(chromedp.Evaluate[chromedp.Void](`document.getElementById("log").scrollTop = 0`))
	a.say("while B reads back")
	b.waitLines(6 + 200 + 1)
	if top, err := chromedp.Run(b.ctx, chromedp.Evaluate[float64](`document.getElementById("log").scrollTop`)); err != nil || top != 0 {
		t.Errorf("B's log scrolled to %v (%v) while B was reading back", top, err)
	}

	if path := os.Getenv("WSAMQP_SCREENSHOT"); path != "" {
		screenshot(t, path, a, b)
	}

	// The name is remembered across reloads.
	a.do(chromedp.Reload())
	a.waitState("connected")
	if name, err := chromedp.Run(a.ctx, chromedp.Value(chromedp.ID("name"))); err != nil || name != "alice" {
		t.Errorf("after reload the name is %q (%v), want alice", name, err)
	}

	// On a phone-sized screen nothing sticks out sideways.
	a.do(chromedp.EmulateViewport(360, 640))
	overflow, err := chromedp.Run(a.ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > window.innerWidth`))
	if err != nil || overflow {
		t.Errorf("page wider than a 360px screen: %v (%v)", overflow, err)
	}
}

// Two windows in two rooms see only their own room's lines; a window
// whose connection drops shows, once it is back, the lines it missed,
// once each, with a quiet note; a room joined later shows its history.
func TestBrowserRoomsAndResume(t *testing.T) {
	browser := newBrowser(t)
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())

	red := openPage(t, browser, "red", tb.server.URL+"/#red")
	blue := openPage(t, browser, "blue", tb.server.URL+"/#blue")
	red.waitState("connected")
	blue.waitState("connected")
	red.say("in red")
	blue.say("in blue")
	checkLines(t, "red", red.waitLines(1), chatLine{"anonymous", "in red"})
	checkLines(t, "blue", blue.waitLines(1), chatLine{"anonymous", "in blue"})
	if room, err := chromedp.Run(red.ctx, chromedp.Value(chromedp.ID("room"))); err != nil || room != "red" {
		t.Errorf("red shows room %q (%v)", room, err)
	}

	// Another window joins red, and shows its history.
	also := openPage(t, browser, "red too", tb.server.URL+"/#red")
	checkLines(t, "red too", also.waitLines(1), chatLine{"anonymous", "in red"})

	// Its connection drops; red talks meanwhile; it comes back by itself
	// and shows what it missed, once.
	also.do(chromedp.Evaluate[chromedp.Void](`socket.close()`))
	for i := range 3 {
		red.say(fmt.Sprint("missed ", i))
	}
	checkLines(t, "red", red.waitLines(4)[1:], chatLine{"anonymous", "missed 0"}, chatLine{"anonymous", "missed 1"}, chatLine{"anonymous", "missed 2"})
	also.waitState("connected")
	red.say("after")
	want := []chatLine{{"anonymous", "in red"}, {"anonymous", "missed 0"}, {"anonymous", "missed 1"}, {"anonymous", "missed 2"}, {"anonymous", "after"}}
	if got := also.waitLines(5); !slices.Equal(got, want) {
		t.Fatalf("red too shows %q, want exactly %q", got, want)
	}
	notes, err := chromedp.Run(also.ctx, chromedp.Evaluate[string](`[...document.querySelectorAll("#log li.note")].map(li => li.textContent).join("|")`))
	// How many of the three arrived before the close took effect, and
	// how many came back restored, depends on timing; a gap never.
	if err != nil || strings.Contains(notes, "missing") {
		t.Errorf("notes after the drop: %q (%v)", notes, err)
	}
	t.Logf("notes after the drop: %q", notes)

	// Switching rooms: a fresh log with the new room's history.
	also.do(chromedp.Evaluate[chromedp.Void](`location.hash = "blue"`))
	also.waitState("connected")
	checkLines(t, "red too, now in blue", also.waitLines(1), chatLine{"anonymous", "in blue"})
}

// The /debug page draws the bus while two windows chat: every channel's
// listeners in priority order, and the publish counts moving.
func TestBrowserDebugPage(t *testing.T) {
	browser := newBrowser(t)
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
	a := openPage(t, browser, "window A", tb.server.URL)
	b := openPage(t, browser, "window B", tb.server.URL)
	a.waitState("connected")
	b.waitState("connected")
	debug := navigate(t, browser, "debug", tb.server.URL+"/debug/")

	listeners := func(channel string) string {
		got, err := chromedp.Run(debug.ctx, chromedp.Evaluate[string](fmt.Sprintf(
			`[...document.querySelectorAll('tr[data-channel=%q] .listener')].map(l => l.textContent).join(" ")`, channel)))
		must(t, err)
		return got
	}
	published := func(channel string) int {
		got, err := chromedp.Run(debug.ctx, chromedp.Evaluate[int](fmt.Sprintf(
			`Number(document.querySelector('tr[data-channel=%q] .published')?.textContent ?? -1)`, channel)))
		must(t, err)
		return got
	}
	debug.do(chromedp.Poll[chromedp.Void](`document.querySelector('tr[data-channel="start"]') !== null`, chromedp.WithPollingTimeout(waitFor)))
	for channel, want := range map[string]string{
		"start":   "amqp (40) ws (60)",
		"stop":    "ws (40) amqp (60)",
		"ws2amqp": "amqp (50)",
		"amqp2ws": "ws (50)",
	} {
		if got := listeners(channel); got != want {
			t.Errorf("/debug shows %s's listeners as %q, want %q", channel, got, want)
		}
	}
	before := published("amqp2ws")
	for i := range 5 {
		a.say(fmt.Sprint("watched ", i))
	}
	b.waitLines(5)
	poll(t, "the page's publish count of amqp2ws moves", func() bool { return published("amqp2ws") >= before+5 })

	if path := os.Getenv("WSAMQP_DEBUG_SCREENSHOT"); path != "" {
		raw, err := chromedp.Run(debug.ctx, chromedp.FullScreenshot(100))
		must(t, err)
		must(t, os.WriteFile(path, raw, 0o644))
		t.Logf("screenshot saved to %s", path)
	}
}

// screenshot saves a picture of two pages side by side, mid-conversation.
// TestBrowserChat takes it when WSAMQP_SCREENSHOT names a file.
func screenshot(t *testing.T, path string, pages ...*chatPage) {
	t.Helper()
	var shots []image.Image
	for _, p := range pages {
		p.do(chromedp.Evaluate[chromedp.Void](`(() => {
			const log = document.getElementById("log");
			[...log.querySelectorAll("li")].slice(6, -4).forEach(li => li.remove());
			log.scrollTop = log.scrollHeight;
		})()`))
		raw, err := chromedp.Run(p.ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		img, _, err := image.Decode(bytes.NewReader(raw))
		if err != nil {
			t.Fatal(err)
		}
		shots = append(shots, img)
	}
	const gap = 16
	w, h := gap, 0
	for _, s := range shots {
		w += s.Bounds().Dx() + gap
		h = max(h, s.Bounds().Dy())
	}
	out := image.NewRGBA(image.Rect(0, 0, w, h+2*gap))
	draw.Draw(out, out.Bounds(), image.NewUniform(color.RGBA{0x55, 0x5a, 0x64, 0xff}), image.Point{}, draw.Src)
	x := gap
	for _, s := range shots {
		draw.Draw(out, s.Bounds().Add(image.Pt(x, gap)), s, s.Bounds().Min, draw.Src)
		x += s.Bounds().Dx() + gap
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := png.Encode(f, out); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot saved to %s", path)
}
