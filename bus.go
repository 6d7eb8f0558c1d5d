package main

// The process bus from "Plugging AMQP and WebSockets": a Go port of
// CherryPy's WSPBus (process/wspbus.py) and of the SignalHandler plugin
// (process/plugins.py).
//
// A bus is a small publish/subscribe hub that owns the life of a process.
// Plugins subscribe listeners to named bus channels; the bus publishes
// on "start", "stop", "graceful", "exit", "log" and "main" as the process
// moves through its states, and plugins are free to publish on channels of
// their own ("ws2amqp", "amqp2ws").
//
// The posts needed the bus's "main" channel to drive pika's asyncore loop,
// since Python had one thread to share between Tornado and pika. Go has
// goroutines: every plugin runs its own loops, so "main" is only a heartbeat
// that plugins may use for periodic chores.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

// State is where a bus is in its life.
//
//	           Start()              start listeners return
//	STOPPED ----------> STARTING ------------------------> STARTED
//	   ^                                                      |
//	   |          stop listeners return           Stop()      |
//	   +-------------------------------- STOPPING <-----------+
//	   |
//	   |  Exit(): Stop() if needed, then
//	   +------------------------------------------> EXITING
//	                                   exit listeners run, "bus EXITED"
//
// A start listener that fails sends the bus straight to Exit.
type State int

// The states of a bus, in the order a process lives through them.
const (
	StateStopped State = iota
	StateStarting
	StateStarted
	StateStopping
	StateExiting
)

func (s State) String() string {
	switch s {
	case StateStopped:
		return "STOPPED"
	case StateStarting:
		return "STARTING"
	case StateStarted:
		return "STARTED"
	case StateStopping:
		return "STOPPING"
	case StateExiting:
		return "EXITING"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// The bus channels that the bus itself publishes on.
const (
	ChannelStart    = "start"    // the bus is STARTING; plugins acquire resources
	ChannelStop     = "stop"     // the bus is STOPPING; plugins release them
	ChannelGraceful = "graceful" // reload configuration, recycle workers; no state change
	ChannelExit     = "exit"     // the bus is EXITING; last words
	ChannelLog      = "log"      // args: msg string, level slog.Level, then slog key/values
	ChannelMain     = "main"     // published every Block interval
)

// DefaultPriority is the priority of a listener that has no reason to run
// early or late. Lower priorities run first.
const DefaultPriority = 50

// ErrRestart is returned by Block when the bus exited because Restart was
// called; main should then call Reexec.
var ErrRestart = errors.New("bus: restart requested")

// Listener is called with the arguments given to Publish. What it returns
// is collected by Publish.
type Listener func(args ...any) (any, error)

// listener is one subscription on one bus channel.
type listener struct {
	name     string // unique per bus channel; names the listener in errors
	priority int
	seq      uint64 // subscription order, to break priority ties
	fn       Listener
}

// Bus is a process bus: a state machine that publishes its transitions to
// named bus channels, and a publish/subscribe hub for anything else.
//
// All listeners of a bus channel are guaranteed to be called, even if
// others fail or panic. A Bus is safe for concurrent use; listeners run on
// the goroutine that publishes, with no lock held, so a listener may
// publish, subscribe or even call Exit.
type Bus struct {
	// mu guards everything below it.
	mu        sync.Mutex
	state     State
	changed   chan struct{} // closed and replaced on every state change
	listeners map[string][]listener
	published map[string]uint64 // publishes per bus channel, for /debug and /metrics
	seq       uint64
	exiting   bool          // Exit has begun; later calls return at once
	exitAsked bool          // Exit was called while STARTING: Start exits once its listeners return
	exited    chan struct{} // closed once the exit listeners have returned
	exitErr   error         // what the stop and exit listeners returned
	restart   bool          // Exit was called by Restart
}

// NewBus returns a STOPPED bus whose "log" channel writes to logger.
func NewBus(logger *slog.Logger) *Bus {
	b := &Bus{
		changed:   make(chan struct{}),
		listeners: make(map[string][]listener),
		published: make(map[string]uint64),
		exited:    make(chan struct{}),
	}
	if logger != nil {
		b.Subscribe(ChannelLog, "slog", DefaultPriority, slogListener(logger))
	}
	return b
}

// slogListener turns "log" publications into slog records.
func slogListener(logger *slog.Logger) Listener {
	return func(args ...any) (any, error) {
		msg, level, attrs := logArgs(args)
		logger.Log(context.Background(), level, msg, attrs...)
		return nil, nil
	}
}

// logArgs unpacks the arguments of a "log" publication.
func logArgs(args []any) (msg string, level slog.Level, attrs []any) {
	if len(args) > 0 {
		msg = fmt.Sprint(args[0])
	}
	if len(args) > 1 {
		level, _ = args[1].(slog.Level)
	}
	if len(args) > 2 {
		attrs = args[2:]
	}
	return msg, level, attrs
}

// Subscribe adds fn to a bus channel under name. Subscribing a name that the
// channel already has replaces its func and priority but keeps its place
// among listeners of equal priority. Lower priorities run first.
func (b *Bus) Subscribe(channel, name string, priority int, fn Listener) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ls := slices.Clone(b.listeners[channel]) // copy on write: Publish ranges over the old slice unlocked
	if i := slices.IndexFunc(ls, func(l listener) bool { return l.name == name }); i >= 0 {
		ls[i].priority, ls[i].fn = priority, fn
	} else {
		b.seq++
		ls = append(ls, listener{name: name, priority: priority, seq: b.seq, fn: fn})
	}
	slices.SortStableFunc(ls, func(x, y listener) int {
		if x.priority != y.priority {
			return x.priority - y.priority
		}
		return int(x.seq - y.seq)
	})
	b.listeners[channel] = ls
}

// Unsubscribe removes the listener called name from a bus channel.
func (b *Bus) Unsubscribe(channel, name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ls := slices.DeleteFunc(slices.Clone(b.listeners[channel]), func(l listener) bool { return l.name == name })
	if len(ls) == 0 {
		delete(b.listeners, channel)
		return
	}
	b.listeners[channel] = ls
}

// Publish calls every listener of a bus channel in priority order and
// returns the outputs of those that succeeded, in order, and the join of
// the errors of those that failed. A listener that panics fails with an
// error naming the channel and the listener. Every failure is also logged
// on the "log" channel, except failures of "log" listeners themselves.
func (b *Bus) Publish(channel string, args ...any) ([]any, error) {
	b.mu.Lock()
	ls := b.listeners[channel] // copied on write, so safe to range without the lock
	b.published[channel]++
	b.mu.Unlock()

	var outputs []any
	var errs []error
	for _, l := range ls {
		out, err := call(channel, l, args)
		if err != nil {
			errs = append(errs, err)
			if channel != ChannelLog {
				b.Log(err.Error(), slog.LevelError)
			}
			continue
		}
		outputs = append(outputs, out)
	}
	return outputs, errors.Join(errs...)
}

// call runs one listener, turning a panic into an error.
func call(channel string, l listener, args []any) (out any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("bus: listener %q on channel %q panicked: %v", l.name, channel, r)
		}
	}()
	out, err = l.fn(args...)
	if err != nil {
		err = fmt.Errorf("bus: listener %q on channel %q: %w", l.name, channel, err)
	}
	return out, err
}

// BusSnapshot is the bus as /debug draws it: its state, and every bus
// channel with its listeners in the order they run and how many times it
// was published on.
type BusSnapshot struct {
	State    string            `json:"state"`
	Channels []ChannelSnapshot `json:"channels"`
}

// ChannelSnapshot is one bus channel in a BusSnapshot.
type ChannelSnapshot struct {
	Name      string             `json:"name"`
	Published uint64             `json:"published"`
	Listeners []ListenerSnapshot `json:"listeners"`
}

// ListenerSnapshot is one listener in a ChannelSnapshot.
type ListenerSnapshot struct {
	Name     string `json:"name"`
	Priority int    `json:"priority"`
}

// Snapshot returns the bus's state and bus channels, sorted by name.
func (b *Bus) Snapshot() BusSnapshot {
	b.mu.Lock()
	defer b.mu.Unlock()
	snap := BusSnapshot{State: b.state.String()}
	names := make(map[string]bool, len(b.listeners)+len(b.published))
	for name := range b.listeners {
		names[name] = true
	}
	for name := range b.published {
		names[name] = true
	}
	for _, name := range slices.Sorted(maps.Keys(names)) {
		c := ChannelSnapshot{Name: name, Published: b.published[name], Listeners: []ListenerSnapshot{}}
		for _, l := range b.listeners[name] {
			c.Listeners = append(c.Listeners, ListenerSnapshot{l.name, l.priority})
		}
		snap.Channels = append(snap.Channels, c)
	}
	return snap
}

// Log publishes msg on the "log" channel. attrs are slog key/value pairs.
func (b *Bus) Log(msg string, level slog.Level, attrs ...any) {
	b.Publish(ChannelLog, append([]any{msg, level}, attrs...)...)
}

// State returns the current state of the bus.
func (b *Bus) State() State {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state
}

// transition moves the bus to state to if it is in one of from (in any
// state when from is empty), wakes every Wait and logs "bus to". It reports
// whether it moved: a listener may have moved the bus on meanwhile, as an
// Exit from inside a start listener does.
func (b *Bus) transition(to State, from ...State) bool {
	b.mu.Lock()
	if len(from) > 0 && !slices.Contains(from, b.state) {
		b.mu.Unlock()
		return false
	}
	b.state = to
	close(b.changed)
	b.changed = make(chan struct{})
	b.mu.Unlock()
	b.Log("bus "+to.String(), slog.LevelInfo)
	return true
}

// Wait blocks until the bus is in one of states.
func (b *Bus) Wait(states ...State) {
	for {
		b.mu.Lock()
		state, changed := b.state, b.changed
		b.mu.Unlock()
		if slices.Contains(states, state) {
			return
		}
		<-changed
	}
}

// Start moves a STOPPED bus to STARTED through the "start" channel. If a
// start listener fails, the bus exits and Start returns the failure. If
// Exit was called meanwhile (Ctrl-C while a plugin dials), the bus exits
// as soon as the start listeners have returned, so that stop listeners
// never run alongside start listeners.
func (b *Bus) Start() error {
	if !b.transition(StateStarting, StateStopped) {
		return fmt.Errorf("bus: cannot start from %s", b.State())
	}
	if _, err := b.Publish(ChannelStart); err != nil {
		b.Log("shutting down due to error in start listener", slog.LevelError, "err", err)
		b.exit()
		return err
	}
	b.mu.Lock()
	asked := b.exitAsked
	b.mu.Unlock()
	if asked {
		b.exit()
		return nil
	}
	if !b.transition(StateStarted, StateStarting) {
		return fmt.Errorf("bus: %s while starting", b.State())
	}
	return nil
}

// Stop moves a STARTING or STARTED bus to STOPPED through the "stop"
// channel. In any other state it does nothing, so stop listeners run once
// per Start even when a stop listener calls Exit. It returns what the stop
// listeners returned.
func (b *Bus) Stop() error {
	if !b.transition(StateStopping, StateStarting, StateStarted) {
		return nil
	}
	_, err := b.Publish(ChannelStop)
	b.transition(StateStopped, StateStopping)
	return err
}

// Exit stops the bus, moves it to EXITING and runs the "exit" listeners.
// Only the first call does anything, so Exit is safe from any goroutine,
// listeners included; use Block or Wait to learn when exit is done. Called
// while the bus is STARTING, it leaves the exit to Start, once the start
// listeners have returned.
func (b *Bus) Exit() {
	b.mu.Lock()
	if b.exiting || b.exitAsked {
		b.mu.Unlock()
		return
	}
	if b.state == StateStarting {
		b.exitAsked = true
		b.mu.Unlock()
		b.Log("bus exit requested while STARTING; exiting once the start listeners return", slog.LevelInfo)
		return
	}
	b.mu.Unlock()
	b.exit()
}

// exit is Exit's work: stop, EXITING, the exit listeners. It keeps what
// the stop and exit listeners returned for Block, as CherryPy's bus makes
// the process's exit status say that an exit listener failed.
func (b *Bus) exit() {
	b.mu.Lock()
	if b.exiting {
		b.mu.Unlock()
		return
	}
	b.exiting = true
	b.mu.Unlock()

	stopErr := b.Stop()
	b.transition(StateExiting)
	_, exitErr := b.Publish(ChannelExit)
	b.mu.Lock()
	b.exitErr = errors.Join(stopErr, exitErr)
	b.mu.Unlock()
	b.Log("bus EXITED", slog.LevelInfo)
	close(b.exited)
}

// Graceful publishes on the "graceful" channel; the state does not change.
func (b *Bus) Graceful() {
	b.Log("bus graceful", slog.LevelInfo)
	b.Publish(ChannelGraceful)
}

// Restart exits the bus and makes Block return ErrRestart, so that main can
// Reexec the program.
func (b *Bus) Restart() {
	b.mu.Lock()
	b.restart = true
	b.mu.Unlock()
	b.Exit()
}

// ErrExit wraps what stop and exit listeners returned, so that main can
// say in the exit status that the process did not end cleanly.
var ErrExit = errors.New("bus: exit listeners failed")

// Block publishes on the "main" channel every interval until the bus has
// exited, then returns ErrRestart if Restart was the cause, an error
// wrapping ErrExit and the failures if a stop or exit listener failed, or
// nil.
func (b *Bus) Block(interval time.Duration) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-b.exited:
			b.mu.Lock()
			defer b.mu.Unlock()
			switch {
			case b.restart:
				return ErrRestart
			case b.exitErr != nil:
				return fmt.Errorf("%w: %w", ErrExit, b.exitErr)
			}
			return nil
		case <-tick.C:
			if b.State() != StateExiting {
				b.Publish(ChannelMain)
			}
		}
	}
}

// Reexec replaces the process with a fresh run of the same binary, with the
// same arguments and environment. It only returns on failure.
func Reexec() error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("reexec: %w", err)
	}
	return fmt.Errorf("reexec %s: %w", exe, syscall.Exec(exe, os.Args, os.Environ()))
}

// SignalHandler is the bus plugin that turns process signals into bus
// transitions: SIGTERM and SIGINT exit, SIGHUP restarts (or exits when the
// process has a terminal, since a foreground Ctrl-C'able program that
// restarts itself on hang-up would outlive its terminal), SIGUSR1 is
// graceful. Before acting it publishes on a bus channel named after the
// signal ("SIGTERM"), so plugins can react to the signal itself.
type SignalHandler struct {
	bus      *Bus
	handlers map[os.Signal]signalAction

	// mu guards the fields below it.
	mu      sync.Mutex
	signals chan os.Signal // non-nil while subscribed
	stop    chan struct{}  // closed by Unsubscribe
	done    chan struct{}  // closed when the watching goroutine has returned
}

// signalAction is what a SignalHandler does with one signal.
type signalAction struct {
	name string
	act  func()
}

// NewSignalHandler returns the signal plugin for b; call Subscribe to start
// handling signals.
func NewSignalHandler(b *Bus) *SignalHandler {
	return &SignalHandler{
		bus: b,
		handlers: map[os.Signal]signalAction{
			syscall.SIGTERM: {"SIGTERM", b.Exit},
			syscall.SIGINT:  {"SIGINT", b.Exit},
			syscall.SIGHUP:  {"SIGHUP", func() { hangUp(b) }},
			syscall.SIGUSR1: {"SIGUSR1", b.Graceful},
		},
	}
}

// hangUp restarts a daemonized process and exits any other, as CherryPy
// does.
func hangUp(b *Bus) {
	if !daemonized() {
		b.Log("SIGHUP caught but not daemonized; exiting", slog.LevelInfo)
		b.Exit()
		return
	}
	b.Log("SIGHUP caught while daemonized; restarting", slog.LevelInfo)
	b.Restart()
}

// daemonized is CherryPy's test as far as Go allows. CherryPy calls a
// process daemonized when its pid changed since start-up (it forked into
// the background) and stdin is not a terminal. A Go process never forks
// itself; what a daemon does that a foreground program does not is lead a
// session of its own (setsid(2), as systemd, setsid(1) and container
// runtimes start it), so here daemonized means that, with no terminal on
// stdin. A program run from a shell, under nohup or &, or by CI is not
// one: it exits on SIGHUP rather than restart itself and drop its
// browsers.
func daemonized() bool {
	sid, err := unix.Getsid(0)
	return err == nil && sid == os.Getpid() && !term.IsTerminal(int(os.Stdin.Fd()))
}

// Subscribe starts handling the plugin's signals and unsubscribes itself
// when the bus exits.
func (h *SignalHandler) Subscribe() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.signals != nil {
		return
	}
	// signal.Notify drops a signal that finds the chan full; one slot is
	// enough because watch hands each signal off at once.
	h.signals = make(chan os.Signal, 1)
	for s := range h.handlers {
		// A signal that was ignored when the process started stays
		// ignored: nohup ignores SIGHUP so that the program outlives its
		// terminal, and must not then exit or restart on it.
		if signal.Ignored(s) {
			continue
		}
		signal.Notify(h.signals, s)
	}
	h.stop, h.done = make(chan struct{}), make(chan struct{})
	go h.watch(h.signals, h.stop, h.done)
	h.bus.Subscribe(ChannelExit, "signals", DefaultPriority, func(...any) (any, error) {
		h.Unsubscribe()
		return nil, nil
	})
}

// watch hands each signal to a goroutine of its own, so that listeners
// reacting to it (an exit listener calls Unsubscribe) never wait on watch.
// It runs on its own goroutine until Unsubscribe.
func (h *SignalHandler) watch(c <-chan os.Signal, stop, done chan struct{}) {
	defer close(done)
	for {
		select {
		case <-stop:
			return
		case s := <-c:
			go h.handle(h.handlers[s])
		}
	}
}

// handle publishes a signal on the bus channel named after it, then acts.
func (h *SignalHandler) handle(a signalAction) {
	h.bus.Log("caught signal "+a.name, slog.LevelInfo)
	h.bus.Publish(a.name)
	a.act()
}

// Unsubscribe restores the signal handling that was in place before
// Subscribe, and waits for the watching goroutine to return.
func (h *SignalHandler) Unsubscribe() {
	h.mu.Lock()
	c, stop, done := h.signals, h.stop, h.done
	h.signals = nil
	h.mu.Unlock()
	if c == nil {
		return
	}
	signal.Stop(c)
	close(stop)
	<-done
}
