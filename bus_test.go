package main

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// recorder collects what happens on a bus, in order: every "log" message
// and every call of a listener subscribed with listen.
type recorder struct {
	mu     sync.Mutex // guards events
	events []string
}

func (r *recorder) add(e string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
}

func (r *recorder) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// newRecordedBus returns a bus with no slog output whose log messages and
// lifecycle channels are recorded.
func newRecordedBus() (*Bus, *recorder) {
	b, r := NewBus(nil), &recorder{}
	b.Subscribe(ChannelLog, "recorder", DefaultPriority, func(args ...any) (any, error) {
		msg, _, _ := logArgs(args)
		r.add(msg)
		return nil, nil
	})
	for _, c := range []string{ChannelStart, ChannelStop, ChannelGraceful, ChannelExit} {
		b.Subscribe(c, "recorder", DefaultPriority, func(...any) (any, error) {
			r.add("<" + c + ">")
			return nil, nil
		})
	}
	return b, r
}

func TestBusStates(t *testing.T) {
	errBoom := errors.New("boom")
	started := []string{"bus STARTING", "<start>", "bus STARTED"}
	stopped := []string{"bus STOPPING", "<stop>", "bus STOPPED"}
	exited := []string{"bus EXITING", "<exit>", "bus EXITED"}
	exitAsked := "bus exit requested while STARTING; exiting once the start listeners return"
	cat := func(parts ...[]string) []string { return slices.Concat(parts...) }

	tests := []struct {
		name    string
		setup   func(b *Bus)
		run     func(b *Bus) error
		want    []string
		state   State
		wantErr bool
	}{{
		name:  "start",
		run:   (*Bus).Start,
		want:  started,
		state: StateStarted,
	}, {
		name:  "start then stop",
		run:   func(b *Bus) error { b.Start(); b.Stop(); return nil },
		want:  cat(started, stopped),
		state: StateStopped,
	}, {
		name:  "stop when stopped does nothing",
		run:   func(b *Bus) error { b.Stop(); return nil },
		want:  nil,
		state: StateStopped,
	}, {
		name:  "start then exit stops first",
		run:   func(b *Bus) error { b.Start(); b.Exit(); return nil },
		want:  cat(started, stopped, exited),
		state: StateExiting,
	}, {
		name:  "exit from stopped skips stop",
		run:   func(b *Bus) error { b.Exit(); return nil },
		want:  exited,
		state: StateExiting,
	}, {
		name:  "double exit runs exit listeners once",
		run:   func(b *Bus) error { b.Start(); b.Exit(); b.Exit(); return nil },
		want:  cat(started, stopped, exited),
		state: StateExiting,
	}, {
		name:  "restart after stop",
		run:   func(b *Bus) error { b.Start(); b.Stop(); return b.Start() },
		want:  cat(started, stopped, started),
		state: StateStarted,
	}, {
		name:    "start after exit fails",
		run:     func(b *Bus) error { b.Exit(); return b.Start() },
		want:    exited,
		state:   StateExiting,
		wantErr: true,
	}, {
		name: "start listener fails",
		setup: func(b *Bus) {
			b.Subscribe(ChannelStart, "failing", DefaultPriority+1, func(...any) (any, error) { return nil, errBoom })
		},
		run: (*Bus).Start,
		want: cat([]string{"bus STARTING", "<start>",
			`bus: listener "failing" on channel "start": boom`,
			"shutting down due to error in start listener"}, stopped, exited),
		state:   StateExiting,
		wantErr: true,
	}, {
		// Exit while STARTING (Ctrl-C while a plugin dials) waits for the
		// start listeners: stop listeners never run alongside them.
		name: "exit from inside a start listener",
		setup: func(b *Bus) {
			b.Subscribe(ChannelStart, "exiter", DefaultPriority+1, func(...any) (any, error) { b.Exit(); return nil, nil })
		},
		run:   (*Bus).Start,
		want:  cat([]string{"bus STARTING", "<start>", exitAsked}, stopped, exited),
		state: StateExiting,
	}, {
		name: "exit from another goroutine while starting",
		setup: func(b *Bus) {
			b.Subscribe(ChannelStart, "exiter", DefaultPriority+1, func(...any) (any, error) {
				asked := make(chan struct{})
				go func() {
					b.Exit()
					close(asked)
				}()
				<-asked
				b.Log("<start listener returns>", slog.LevelInfo)
				return nil, nil
			})
		},
		run:   (*Bus).Start,
		want:  cat([]string{"bus STARTING", "<start>", exitAsked, "<start listener returns>"}, stopped, exited),
		state: StateExiting,
	}, {
		name: "exit from inside a stop listener",
		setup: func(b *Bus) {
			b.Subscribe(ChannelStop, "exiter", DefaultPriority+1, func(...any) (any, error) { b.Exit(); return nil, nil })
		},
		run:   func(b *Bus) error { b.Start(); b.Stop(); return nil },
		want:  cat(started, []string{"bus STOPPING", "<stop>"}, exited),
		state: StateExiting,
	}, {
		name: "publish during stop",
		setup: func(b *Bus) {
			b.Subscribe(ChannelStop, "flusher", DefaultPriority+1, func(...any) (any, error) {
				b.Publish("flush", "last words")
				return nil, nil
			})
			b.Subscribe("flush", "sink", DefaultPriority, func(args ...any) (any, error) {
				b.Log(fmt.Sprintf("flushed %v while %s", args[0], b.State()), slog.LevelInfo)
				return nil, nil
			})
		},
		run:   func(b *Bus) error { b.Start(); b.Stop(); return nil },
		want:  cat(started, []string{"bus STOPPING", "<stop>", "flushed last words while STOPPING", "bus STOPPED"}),
		state: StateStopped,
	}, {
		name:  "graceful keeps the state",
		run:   func(b *Bus) error { b.Start(); b.Graceful(); return nil },
		want:  cat(started, []string{"bus graceful", "<graceful>"}),
		state: StateStarted,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, r := newRecordedBus()
			if tt.setup != nil {
				tt.setup(b)
			}
			err := tt.run(b)
			if (err != nil) != tt.wantErr {
				t.Errorf("error = %v, want error: %v", err, tt.wantErr)
			}
			if got := r.all(); !slices.Equal(got, tt.want) {
				t.Errorf("events:\n got %q\nwant %q", got, tt.want)
			}
			if got := b.State(); got != tt.state {
				t.Errorf("state = %s, want %s", got, tt.state)
			}
		})
	}
}

// A stop or exit listener that fails makes Block say so, so that the
// process's exit status can: CherryPy exits with 70 when an exit listener
// fails.
func TestBlockReportsFailedExit(t *testing.T) {
	errLost := errors.New("3 messages not confirmed")
	b := NewBus(nil)
	b.Subscribe(ChannelStop, "drain", DefaultPriority, func(...any) (any, error) { return nil, errLost })
	must(t, b.Start())
	go b.Exit()
	err := b.Block(time.Millisecond)
	if !errors.Is(err, ErrExit) || !errors.Is(err, errLost) {
		t.Fatalf("Block = %v, want ErrExit wrapping the stop listener's error", err)
	}
}

func TestPublish(t *testing.T) {
	b, r := newRecordedBus()
	say := func(s string) Listener {
		return func(...any) (any, error) { return s, nil }
	}
	b.Subscribe("c", "late", 90, say("late"))
	b.Subscribe("c", "tie1", DefaultPriority, say("tie1"))
	b.Subscribe("c", "early", 10, say("early"))
	b.Subscribe("c", "tie2", DefaultPriority, say("tie2"))
	b.Subscribe("c", "failing", 60, func(...any) (any, error) { return nil, errors.New("no") })
	b.Subscribe("c", "panicking", 70, func(...any) (any, error) { panic("oops") })

	out, err := b.Publish("c")
	if want := []any{"early", "tie1", "tie2", "late"}; !slices.Equal(out, want) {
		t.Errorf("outputs = %v, want %v", out, want)
	}
	wantErr := "bus: listener \"failing\" on channel \"c\": no\n" +
		"bus: listener \"panicking\" on channel \"c\" panicked: oops"
	if err == nil || err.Error() != wantErr {
		t.Errorf("error = %v, want %q", err, wantErr)
	}
	if got := r.all(); !slices.Equal(got, strings.Split(wantErr, "\n")) {
		t.Errorf("logged %q, want each failure", got)
	}

	// Subscribing a name again moves it; unsubscribing removes it.
	b.Subscribe("c", "late", 0, say("now first"))
	b.Unsubscribe("c", "failing")
	b.Unsubscribe("c", "panicking")
	b.Unsubscribe("c", "never subscribed")
	out, err = b.Publish("c")
	if want := []any{"now first", "early", "tie1", "tie2"}; !slices.Equal(out, want) || err != nil {
		t.Errorf("after resubscribe: %v, %v; want %v, nil", out, err, want)
	}

	if out, err := b.Publish("nobody listens"); out != nil || err != nil {
		t.Errorf("publish without listeners = %v, %v; want nil, nil", out, err)
	}
}

func TestPublishLogListenerFailureIsNotLogged(t *testing.T) {
	b := NewBus(nil)
	calls := 0
	b.Subscribe(ChannelLog, "broken", DefaultPriority, func(...any) (any, error) {
		calls++
		return nil, errors.New("disk full")
	})
	if _, err := b.Publish(ChannelLog, "hello", slog.LevelInfo); err == nil {
		t.Error("publish on log: want the listener's error")
	}
	if calls != 1 {
		t.Errorf("log listener called %d times, want 1 (its failure must not be logged through itself)", calls)
	}
}

func TestPublishConcurrent(t *testing.T) {
	b := NewBus(nil)
	var mu sync.Mutex // guards counts
	counts := map[string]int{}
	b.Subscribe("inner", "count", DefaultPriority, func(args ...any) (any, error) {
		mu.Lock()
		defer mu.Unlock()
		counts[args[0].(string)]++
		return nil, nil
	})
	// A listener that publishes on another bus channel must not deadlock.
	b.Subscribe("outer", "relay", DefaultPriority, func(args ...any) (any, error) {
		return b.Publish("inner", args...)
	})

	const goroutines, rounds = 8, 200
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for range rounds {
				b.Publish("outer", "relayed")
			}
		})
		wg.Go(func() {
			name := fmt.Sprint("churn", g)
			for i := range rounds {
				b.Subscribe("outer", name, i%100, func(...any) (any, error) { return nil, nil })
				b.Unsubscribe("outer", name)
			}
		})
	}
	wg.Wait()
	if got := counts["relayed"]; got != goroutines*rounds {
		t.Errorf("relayed %d messages, want %d", got, goroutines*rounds)
	}
}

func TestWaitAndBlock(t *testing.T) {
	b := NewBus(nil)
	waited := make(chan struct{})
	go func() {
		b.Wait(StateStarted)
		close(waited)
	}()
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	<-waited // Wait returned once the bus was STARTED

	mains := 0
	b.Subscribe(ChannelMain, "counter", DefaultPriority, func(...any) (any, error) {
		if mains++; mains == 3 {
			b.Exit()
		}
		return nil, nil
	})
	if err := b.Block(time.Millisecond); err != nil {
		t.Errorf("Block = %v, want nil", err)
	}
	if mains != 3 {
		t.Errorf("main published %d times, want 3", mains)
	}
}

func TestRestartMakesBlockReturnErrRestart(t *testing.T) {
	b := NewBus(nil)
	b.Start()
	go b.Restart()
	if err := b.Block(time.Hour); !errors.Is(err, ErrRestart) {
		t.Errorf("Block = %v, want ErrRestart", err)
	}
}

func ExampleBus_Publish() {
	b := NewBus(nil)
	b.Subscribe("greet", "world", DefaultPriority, func(args ...any) (any, error) {
		return fmt.Sprintf("hello, %v", args[0]), nil
	})
	b.Subscribe("greet", "first", 10, func(args ...any) (any, error) {
		return fmt.Sprintf("lower priorities run first, %v", args[0]), nil
	})
	b.Subscribe("greet", "grumpy", 90, func(...any) (any, error) {
		return nil, errors.New("not today")
	})
	out, err := b.Publish("greet", "gopher")
	for _, o := range out {
		fmt.Println(o)
	}
	fmt.Println(err)
	// Output:
	// lower priorities run first, gopher
	// hello, gopher
	// bus: listener "grumpy" on channel "greet": not today
}

func ExampleBus_Exit() {
	b := NewBus(nil)
	b.Subscribe(ChannelLog, "print", DefaultPriority, func(args ...any) (any, error) {
		msg, _, _ := logArgs(args)
		fmt.Println(msg)
		return nil, nil
	})
	b.Subscribe(ChannelStop, "plugin", DefaultPriority, func(...any) (any, error) {
		fmt.Println("  plugin releases its resources")
		return nil, nil
	})
	b.Start()
	b.Exit()
	// Output:
	// bus STARTING
	// bus STARTED
	// bus STOPPING
	//   plugin releases its resources
	// bus STOPPED
	// bus EXITING
	// bus EXITED
}

// TestSignalHelper is not a test: TestSignals runs the test binary again
// with WSAMQP_SIGNAL_HELPER set, and this function then plays a process
// whose bus is driven by real signals.
func TestSignalHelper(t *testing.T) {
	if os.Getenv("WSAMQP_SIGNAL_HELPER") == "" {
		t.Skip("helper process for TestSignals")
	}
	generation := os.Getenv("WSAMQP_GENERATION")
	if os.Getenv("WSAMQP_SIGNAL_HELPER") == "nohup" {
		// As nohup(1) does before it starts the program. The helper
		// re-runs itself so that the ignore is in place at its start.
		if !signal.Ignored(syscall.SIGHUP) {
			signal.Ignore(syscall.SIGHUP)
			fmt.Println(Reexec())
		}
	}
	b := NewBus(nil)
	b.Subscribe(ChannelLog, "stdout", DefaultPriority, func(args ...any) (any, error) {
		msg, _, _ := logArgs(args)
		fmt.Println(msg)
		return nil, nil
	})
	b.Subscribe("SIGUSR1", "echo", DefaultPriority, func(...any) (any, error) {
		fmt.Println("plugin saw SIGUSR1")
		return nil, nil
	})
	h := NewSignalHandler(b)
	h.Subscribe()
	if os.Getenv("WSAMQP_SIGNAL_HELPER") == "unsubscribe" {
		h.Unsubscribe()
		fmt.Println("unsubscribed")
		select {} // SIGTERM's default action ends the process
	}
	b.Start()
	fmt.Println("ready in generation", generation)
	err := b.Block(10 * time.Millisecond)
	if errors.Is(err, ErrRestart) {
		os.Setenv("WSAMQP_GENERATION", generation+"I")
		fmt.Println(Reexec())
	}
	os.Exit(0)
}

// startSignalHelper runs TestSignalHelper in a child process with env
// added, and returns it with an expect func that reads the child's output
// until a line equals want, failing the test if the output ends first.
// The child's stdin is a pipe, not a terminal; with daemon it also leads
// a session of its own, as a daemon does, so SIGHUP restarts it.
func startSignalHelper(t *testing.T, daemon bool, env ...string) (cmd *exec.Cmd, expect func(want string) (read []string)) {
	t.Helper()
	cmd = exec.Command(os.Args[0], "-test.run=^TestSignalHelper$")
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: daemon}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close() })
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	lines := make(chan string) // closed when the child's output ends
	go func() {
		defer close(lines)
		for sc := bufio.NewScanner(stdout); sc.Scan(); {
			lines <- sc.Text()
		}
	}()
	return cmd, func(want string) (read []string) {
		t.Helper()
		deadline := time.NewTimer(waitFor)
		defer deadline.Stop()
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					t.Fatalf("helper ended before printing %q", want)
				}
				if read = append(read, line); line == want {
					return read
				}
			case <-deadline.C:
				t.Fatalf("helper did not print %q within %v; it printed:\n%s", want, waitFor, strings.Join(read, "\n"))
			}
		}
	}
}

// waitHelper waits for the helper process to end, killing it after
// waitFor, and returns how it ended.
func waitHelper(t *testing.T, cmd *exec.Cmd) error {
	t.Helper()
	ended := make(chan error, 1)
	go func() { ended <- cmd.Wait() }()
	select {
	case err := <-ended:
		return err
	case <-time.After(waitFor):
		cmd.Process.Kill()
		return fmt.Errorf("still running after %v; killed (%v)", waitFor, <-ended)
	}
}

func TestSignals(t *testing.T) {
	cmd, expect := startSignalHelper(t, true, "WSAMQP_SIGNAL_HELPER=1", "WSAMQP_GENERATION=I")
	signal := func(s syscall.Signal) {
		t.Helper()
		if err := cmd.Process.Signal(s); err != nil {
			t.Fatal(err)
		}
	}

	expect("ready in generation I")
	signal(syscall.SIGUSR1)
	expect("caught signal SIGUSR1")
	expect("plugin saw SIGUSR1")
	expect("bus graceful")

	signal(syscall.SIGHUP)
	expect("SIGHUP caught while daemonized; restarting")
	expect("bus EXITED")
	expect("ready in generation II") // the same process, executed anew

	signal(syscall.SIGTERM)
	expect("caught signal SIGTERM")
	expect("bus STOPPED")
	expect("bus EXITED")
	if err := waitHelper(t, cmd); err != nil {
		t.Errorf("helper exited with %v, want success", err)
	}
}

// A process that is not daemonized (run from a shell, or by CI) exits on
// SIGHUP rather than restart itself, as in CherryPy.
func TestSIGHUPExitsWhenNotDaemonized(t *testing.T) {
	cmd, expect := startSignalHelper(t, false, "WSAMQP_SIGNAL_HELPER=1", "WSAMQP_GENERATION=I")
	expect("ready in generation I")
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	expect("SIGHUP caught but not daemonized; exiting")
	expect("bus EXITED")
	if err := waitHelper(t, cmd); err != nil {
		t.Errorf("helper exited with %v, want success", err)
	}
}

// A SIGHUP ignored when the process started (nohup) stays ignored.
func TestSIGHUPIgnoredUnderNohup(t *testing.T) {
	cmd, expect := startSignalHelper(t, true, "WSAMQP_SIGNAL_HELPER=nohup", "WSAMQP_GENERATION=I")
	expect("ready in generation I")
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// SIGUSR1 and SIGTERM go through the same handler after SIGHUP, so
	// by their lines, a handled SIGHUP would have said so first.
	if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	read := expect("plugin saw SIGUSR1")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	read = append(read, expect("bus EXITED")...)
	if slices.Contains(read, "caught signal SIGHUP") {
		t.Errorf("SIGHUP was handled under nohup:\n%s", strings.Join(read, "\n"))
	}
	if err := waitHelper(t, cmd); err != nil {
		t.Errorf("helper exited with %v, want success", err)
	}
}

func TestSignalHandlerUnsubscribeRestoresDefault(t *testing.T) {
	cmd, expect := startSignalHelper(t, false, "WSAMQP_SIGNAL_HELPER=unsubscribe")
	expect("unsubscribed")
	// With the plugin gone, SIGTERM does what Go does by default: it
	// kills the process, instead of an exit on the bus.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err := waitHelper(t, cmd)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Fatalf("helper ended with %v, want death by SIGTERM", err)
	}
}
