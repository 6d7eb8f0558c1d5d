package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// syncBuffer is a bytes.Buffer that run's goroutines may write while the
// test reads it.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startRun runs the program in the background with args, waits until it
// serves, and returns its base URL, its output, and a func that cancels
// its context and returns what run returned.
func startRun(t *testing.T, args ...string) (string, *syncBuffer, func() error) {
	t.Helper()
	out := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, append([]string{"-addr", "127.0.0.1:0"}, args...), out) }()
	serving := regexp.MustCompile(`msg="serving chat" url=(\S+)`)
	var base string
	poll(t, "the program serves", func() bool {
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v\n%s", err, out)
		default:
		}
		m := serving.FindStringSubmatch(out.String())
		if m != nil {
			base = m[1]
		}
		return m != nil
	})
	stop := func() error {
		cancel()
		return <-done
	}
	return base, out, stop
}

func TestRunServesAndExitsCleanly(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		base, out, stop := startRun(t, "-amqp", broker.url, "-exchange", exchange, "-stream", exchange)
		for path, want := range map[string]int{"/": 200, "/chat.js": 200, "/healthz": 200, "/ws": 400, "/nope": 404} {
			resp, err := http.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
			}
			if path == "/" && !strings.Contains(resp.Header.Get("Content-Security-Policy"), "default-src 'self'") {
				t.Errorf("GET /: Content-Security-Policy = %q", resp.Header.Get("Content-Security-Policy"))
			}
		}
		if err := stop(); err != nil {
			t.Errorf("run = %v, want nil", err)
		}
		log := out.String()
		for _, want := range []string{"amqp connected", "bus STOPPING", "bus EXITED"} {
			if !strings.Contains(log, want) {
				t.Errorf("log lacks %q:\n%s", want, log)
			}
		}
		if strings.Contains(log, ":guest@") {
			t.Errorf("log shows the AMQP password:\n%s", log)
		}
	})
}

func TestRunFailsWhenTheBrokerIsUnreachable(t *testing.T) {
	out := &syncBuffer{}
	err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-amqp", "amqp://user:s3cret@127.0.0.1:1/"}, out)
	if err == nil {
		t.Fatal("run succeeded without a broker")
	}
	for _, text := range []string{err.Error(), out.String()} {
		if strings.Contains(text, "s3cret") {
			t.Errorf("password in %q", text)
		}
	}
	if !strings.Contains(err.Error(), "amqp dial amqp://user:xxxxx@127.0.0.1:1/") {
		t.Errorf("error %q does not name the operation and the redacted URL", err)
	}
}

func TestHelpListsEveryLimit(t *testing.T) {
	t.Setenv("AMQP_URL", "amqp://guest:hunter2@example.invalid/")
	out := &syncBuffer{}
	if err := run(context.Background(), []string{"-h"}, out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run -h = %v, want flag.ErrHelp", err)
	}
	for _, f := range []string{"-addr", "-amqp", "-exchange", "-origin", "-max-message", "-send-queue", "-max-conns",
		"-write-wait", "-pong-wait", "-outbox", "-prefetch", "-max-backoff", "-drain-timeout", "-shutdown-timeout",
		"-rate", "-burst", "-read-header-timeout", "-stream", "-stream-max-bytes", "-stream-max-age", "-stream-segment-bytes",
		"-replay-bytes", "-stream-wait", "-stream-replicas", "-history", "-history-max", "-history-bytes", "-broker-listen", "-broker-max-queue", "-log-level",
		"-hosts", "-metrics-addr", "-amqp-timeout", "-send-queue-bytes", "-max-conns-per-ip", "-max-header-bytes", "-outbox-bytes", "-broker-user", "-broker-password",
		"-broker-max-queue-bytes", "-broker-max-memory", "-broker-max-conns", "-broker-channel-max", "-broker-max-queues",
		"-broker-max-exchanges", "-broker-max-consumers"} {
		if !strings.Contains(out.String(), "  "+f+" ") {
			t.Errorf("-h does not list %s", f)
		}
	}
	if strings.Contains(out.String(), "hunter2") {
		t.Error("-h prints the password from AMQP_URL")
	}
	// Every numeric limit shows its range.
	for _, r := range flagRanges {
		if !strings.Contains(out.String(), fmt.Sprintf("[%v, %v]", r.min, r.max)) {
			t.Errorf("-h does not show the range of -%s", r.name)
		}
	}
}
