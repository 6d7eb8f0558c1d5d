package main

// The embedded broker's wire format: AMQP 0-9-1 frames, methods, field
// tables and reply codes, as the specification defines them.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"time"
)

// Frame types, and the octet that ends every frame.
const (
	frameMethod    = 1
	frameHeader    = 2
	frameBody      = 3
	frameHeartbeat = 8
	frameEnd       = 0xCE
)

// frameMinSize is the largest frame both peers must accept before tuning.
const frameMinSize = 4096

// Reply codes, as RabbitMQ sends them.
const (
	replySuccess            = 200
	replyNoRoute            = 312
	replyConnectionForced   = 320
	replyAccessRefused      = 403
	replyNotFound           = 404
	replyResourceLocked     = 405
	replyPreconditionFailed = 406
	replyFrameError         = 501
	replySyntaxError        = 502
	replyCommandInvalid     = 503
	replyChannelError       = 504
	replyUnexpectedFrame    = 505
	replyNotAllowed         = 530
	replyNotImplemented     = 540
	replyInternalError      = 541
)

// method identifies an AMQP method: its class id in the high 16 bits, its
// method id in the low 16.
type method uint32

func (m method) class() uint16 { return uint16(m >> 16) }
func (m method) id() uint16    { return uint16(m) }

// The methods the broker sends or answers.
const (
	connectionStart     method = 10<<16 | 10
	connectionStartOk   method = 10<<16 | 11
	connectionTune      method = 10<<16 | 30
	connectionTuneOk    method = 10<<16 | 31
	connectionOpen      method = 10<<16 | 40
	connectionOpenOk    method = 10<<16 | 41
	connectionClose     method = 10<<16 | 50
	connectionCloseOk   method = 10<<16 | 51
	channelOpen         method = 20<<16 | 10
	channelOpenOk       method = 20<<16 | 11
	channelFlow         method = 20<<16 | 20
	channelFlowOk       method = 20<<16 | 21
	channelClose        method = 20<<16 | 40
	channelCloseOk      method = 20<<16 | 41
	exchangeDeclare     method = 40<<16 | 10
	exchangeDeclareOk   method = 40<<16 | 11
	exchangeDelete      method = 40<<16 | 20
	exchangeDeleteOk    method = 40<<16 | 21
	exchangeBind        method = 40<<16 | 30
	exchangeBindOk      method = 40<<16 | 31
	exchangeUnbind      method = 40<<16 | 40
	exchangeUnbindOk    method = 40<<16 | 51
	queueDeclare        method = 50<<16 | 10
	queueDeclareOk      method = 50<<16 | 11
	queueBind           method = 50<<16 | 20
	queueBindOk         method = 50<<16 | 21
	queuePurge          method = 50<<16 | 30
	queuePurgeOk        method = 50<<16 | 31
	queueDelete         method = 50<<16 | 40
	queueDeleteOk       method = 50<<16 | 41
	queueUnbind         method = 50<<16 | 50
	queueUnbindOk       method = 50<<16 | 51
	basicQos            method = 60<<16 | 10
	basicQosOk          method = 60<<16 | 11
	basicConsume        method = 60<<16 | 20
	basicConsumeOk      method = 60<<16 | 21
	basicCancel         method = 60<<16 | 30
	basicCancelOk       method = 60<<16 | 31
	basicPublish        method = 60<<16 | 40
	basicReturn         method = 60<<16 | 50
	basicDeliver        method = 60<<16 | 60
	basicGet            method = 60<<16 | 70
	basicGetOk          method = 60<<16 | 71
	basicGetEmpty       method = 60<<16 | 72
	basicAck            method = 60<<16 | 80
	basicReject         method = 60<<16 | 90
	basicRecoverAsync   method = 60<<16 | 100
	basicRecover        method = 60<<16 | 110
	basicRecoverOk      method = 60<<16 | 111
	basicNack           method = 60<<16 | 120
	confirmSelect       method = 85<<16 | 10
	confirmSelectOk     method = 85<<16 | 11
	txSelect            method = 90<<16 | 10
	txSelectOk          method = 90<<16 | 11
	txCommit            method = 90<<16 | 20
	txCommitOk          method = 90<<16 | 21
	txRollback          method = 90<<16 | 30
	txRollbackOk        method = 90<<16 | 31
	connectionBlocked   method = 10<<16 | 60
	connectionUnblocked method = 10<<16 | 61
)

// classBasic is the class of content-carrying methods and headers.
const classBasic = 60

// Table is an AMQP field table.
type Table map[string]any

// maxTableDepth bounds how deeply tables and arrays may nest, so that a
// hostile frame cannot exhaust the stack.
const maxTableDepth = 16

// wireReader decodes method arguments. The first error sticks: later reads
// return zero values, and the caller checks err once.
type wireReader struct {
	b    []byte
	err  error
	bits byte // the octet that packed bits are read from
	nbit int  // bits already read from it; 0 or 8 means read a new one
}

var errShort = errors.New("truncated arguments")

// take returns the next n bytes, or nil once the input runs out.
func (r *wireReader) take(n int) []byte {
	r.nbit = 0 // any non-bit field ends a run of packed bits
	if r.err != nil || n < 0 || n > len(r.b) {
		r.err = firstErr(r.err, errShort)
		return nil
	}
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

// firstErr returns a if it is an error, else b.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (r *wireReader) octet() byte {
	if p := r.take(1); p != nil {
		return p[0]
	}
	return 0
}

func (r *wireReader) short() uint16 {
	if p := r.take(2); p != nil {
		return binary.BigEndian.Uint16(p)
	}
	return 0
}

func (r *wireReader) long() uint32 {
	if p := r.take(4); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (r *wireReader) longlong() uint64 {
	if p := r.take(8); p != nil {
		return binary.BigEndian.Uint64(p)
	}
	return 0
}

func (r *wireReader) shortstr() string { return string(r.take(int(r.octet()))) }

func (r *wireReader) longstr() []byte {
	n := r.long()
	if n > math.MaxInt32 {
		r.err = firstErr(r.err, errShort)
		return nil
	}
	return r.take(int(n))
}

// bit reads the next of a run of bits packed into octets, lowest bit first.
func (r *wireReader) bit() bool {
	if r.nbit == 0 || r.nbit == 8 {
		r.bits = r.octet()
	}
	v := r.bits&(1<<r.nbit) != 0
	r.nbit++
	return v
}

// table reads a field table.
func (r *wireReader) table() Table { return r.tableDepth(0) }

func (r *wireReader) tableDepth(depth int) Table {
	data := r.longstr()
	if r.err != nil {
		return nil
	}
	if depth > maxTableDepth {
		r.err = errors.New("tables nested too deeply")
		return nil
	}
	t := Table{}
	sub := &wireReader{b: data}
	for len(sub.b) > 0 && sub.err == nil {
		key := sub.shortstr()
		t[key] = sub.field(depth)
	}
	r.err = firstErr(r.err, sub.err)
	return t
}

// field reads one typed value of a table or array.
func (r *wireReader) field(depth int) any {
	switch typ := r.octet(); typ {
	case 't':
		return r.octet() != 0
	case 'b':
		return int8(r.octet())
	case 'B':
		return r.octet()
	case 's':
		return int16(r.short())
	case 'u':
		return r.short()
	case 'I':
		return int32(r.long())
	case 'i':
		return r.long()
	case 'l':
		return int64(r.longlong())
	case 'f':
		return math.Float32frombits(r.long())
	case 'd':
		return math.Float64frombits(r.longlong())
	case 'D':
		scale := r.octet()
		return [2]any{scale, int32(r.long())}
	case 'S':
		return string(r.longstr())
	case 'x':
		return slices.Clone(r.longstr())
	case 'T':
		return time.Unix(int64(r.longlong()), 0)
	case 'F':
		return r.tableDepth(depth + 1)
	case 'A':
		data := r.longstr()
		if depth > maxTableDepth {
			r.err = firstErr(r.err, errors.New("arrays nested too deeply"))
		}
		var a []any
		sub := &wireReader{b: data}
		for r.err == nil && len(sub.b) > 0 && sub.err == nil {
			a = append(a, sub.field(depth+1))
		}
		r.err = firstErr(r.err, sub.err)
		return a
	case 'V':
		return nil
	default:
		r.err = firstErr(r.err, fmt.Errorf("unknown field type %q", typ))
		return nil
	}
}

// wireWriter encodes method arguments.
type wireWriter struct {
	b    []byte
	nbit int // bits packed into the last octet; 0 or 8 means start a new one
}

func (w *wireWriter) octet(v byte)      { w.nbit = 0; w.b = append(w.b, v) }
func (w *wireWriter) short(v uint16)    { w.nbit = 0; w.b = binary.BigEndian.AppendUint16(w.b, v) }
func (w *wireWriter) long(v uint32)     { w.nbit = 0; w.b = binary.BigEndian.AppendUint32(w.b, v) }
func (w *wireWriter) longlong(v uint64) { w.nbit = 0; w.b = binary.BigEndian.AppendUint64(w.b, v) }

// shortstr writes s, cut to the 255 bytes a short string can hold.
func (w *wireWriter) shortstr(s string) {
	s = s[:min(len(s), 255)]
	w.octet(byte(len(s)))
	w.b = append(w.b, s...)
}

func (w *wireWriter) longstr(s []byte) {
	w.long(uint32(len(s)))
	w.b = append(w.b, s...)
}

// bit packs v into the current octet, lowest bit first.
func (w *wireWriter) bit(v bool) {
	if w.nbit == 0 || w.nbit == 8 {
		w.b = append(w.b, 0)
		w.nbit = 0
	}
	if v {
		w.b[len(w.b)-1] |= 1 << w.nbit
	}
	w.nbit++
}

// table writes t, whose values may be strings, bools, integers and tables:
// all the broker ever sends.
func (w *wireWriter) table(t Table) {
	sub := &wireWriter{}
	for _, k := range slices.Sorted(maps.Keys(t)) {
		sub.shortstr(k)
		sub.field(t[k])
	}
	w.longstr(sub.b)
}

// field writes one typed field value: every type that wireReader.field
// returns, plus int, so that a table read from a client can be written
// back as it was.
func (w *wireWriter) field(v any) {
	switch v := v.(type) {
	case bool:
		w.octet('t')
		if v {
			w.octet(1)
		} else {
			w.octet(0)
		}
	case int8:
		w.octet('b')
		w.octet(byte(v))
	case uint8:
		w.octet('B')
		w.octet(v)
	case int16:
		w.octet('s')
		w.short(uint16(v))
	case uint16:
		w.octet('u')
		w.short(v)
	case int32:
		w.octet('I')
		w.long(uint32(v))
	case uint32:
		w.octet('i')
		w.long(v)
	case int64:
		w.octet('l')
		w.longlong(uint64(v))
	case int:
		w.octet('l')
		w.longlong(uint64(v))
	case float32:
		w.octet('f')
		w.long(math.Float32bits(v))
	case float64:
		w.octet('d')
		w.longlong(math.Float64bits(v))
	case [2]any: // decimal, as the reader returns it
		w.octet('D')
		w.octet(v[0].(byte))
		w.long(uint32(v[1].(int32)))
	case string:
		w.octet('S')
		w.longstr([]byte(v))
	case []byte:
		w.octet('x')
		w.longstr(v)
	case time.Time:
		w.octet('T')
		w.longlong(uint64(v.Unix()))
	case Table:
		w.octet('F')
		w.table(v)
	case []any:
		w.octet('A')
		sub := &wireWriter{}
		for _, e := range v {
			sub.field(e)
		}
		w.longstr(sub.b)
	case nil:
		w.octet('V')
	default:
		panic(fmt.Sprintf("broker: cannot encode %T in a table", v))
	}
}

// Basic content properties, in the order of their flag bits (bit 15
// first), and the encoding of each.
var basicProps = [...]struct {
	name string
	kind byte // 's' shortstr, 'F' table, 'o' octet, 'l' longlong
}{
	{"content-type", 's'}, {"content-encoding", 's'}, {"headers", 'F'},
	{"delivery-mode", 'o'}, {"priority", 'o'}, {"correlation-id", 's'},
	{"reply-to", 's'}, {"expiration", 's'}, {"message-id", 's'},
	{"timestamp", 'l'}, {"type", 's'}, {"user-id", 's'}, {"app-id", 's'},
	{"cluster-id", 's'},
}

// properties is a content header's property list, decoded only as far as
// the broker needs: the expiration (per-message TTL) and the headers
// (x-death). Everything else is kept as the raw bytes of each property.
type properties struct {
	flags   uint16
	raw     [len(basicProps)][]byte // each present property's encoding
	headers Table
}

// decodeProperties parses a content header's property flags and list.
func decodeProperties(b []byte) (properties, error) {
	var p properties
	r := &wireReader{b: b}
	p.flags = r.short()
	for i, prop := range basicProps {
		if p.flags&(1<<(15-i)) == 0 {
			continue
		}
		start := r.b
		switch prop.kind {
		case 's':
			r.shortstr()
		case 'F':
			p.headers = r.table()
		case 'o':
			r.octet()
		case 'l':
			r.longlong()
		}
		if r.err != nil {
			return p, fmt.Errorf("property %s: %w", prop.name, r.err)
		}
		p.raw[i] = start[:len(start)-len(r.b)]
	}
	if p.flags&1 != 0 {
		return p, errors.New("property flags continue past one word")
	}
	return p, r.err
}

// shortstr returns the string property at index i, or "".
func (p *properties) shortstr(i int) string {
	if p.raw[i] == nil {
		return ""
	}
	return string(p.raw[i][1:])
}

// encode returns the property flags and list, with p.headers in place of
// the headers that were read.
func (p *properties) encode() []byte {
	w := &wireWriter{}
	flags := p.flags
	if p.headers != nil {
		flags |= 1 << (15 - 2)
	}
	w.short(flags)
	for i := range basicProps {
		switch {
		case i == 2 && p.headers != nil:
			w.table(p.headers)
		case flags&(1<<(15-i)) != 0:
			w.b = append(w.b, p.raw[i]...)
		}
	}
	return w.b
}

// Indexes into basicProps.
const (
	propExpiration = 7
)

// appendFrame appends one frame to buf.
func appendFrame(buf []byte, typ byte, channel uint16, payload []byte) []byte {
	buf = append(buf, typ)
	buf = binary.BigEndian.AppendUint16(buf, channel)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(payload)))
	buf = append(buf, payload...)
	return append(buf, frameEnd)
}

// appendMethod appends a method frame whose arguments args writes.
func appendMethod(buf []byte, channel uint16, m method, args func(w *wireWriter)) []byte {
	w := &wireWriter{}
	w.short(m.class())
	w.short(m.id())
	if args != nil {
		args(w)
	}
	return appendFrame(buf, frameMethod, channel, w.b)
}

// appendContent appends a message's header frame and its body split into
// body frames that fit frameMax.
func appendContent(buf []byte, channel uint16, msg *message, frameMax int) []byte {
	w := &wireWriter{}
	w.short(classBasic)
	w.short(0) // weight
	w.longlong(uint64(len(msg.body)))
	w.b = append(w.b, msg.props...)
	buf = appendFrame(buf, frameHeader, channel, w.b)
	for body, chunk := msg.body, frameMax-8; len(body) > 0; {
		n := min(len(body), chunk)
		buf = appendFrame(buf, frameBody, channel, body[:n])
		body = body[n:]
	}
	return buf
}

// frame is one frame read off the wire.
type frame struct {
	typ     byte
	channel uint16
	payload []byte
}

// errBadFrame is a frame larger than the negotiated maximum, or one that
// does not end with frameEnd.
var errBadFrame = errors.New("bad frame")

// readFrame reads one frame of at most frameMax bytes. An oversized frame
// is refused by its header, before anything is allocated for it.
func readFrame(r *bufio.Reader, frameMax int) (frame, error) {
	var head [7]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return frame{}, err
	}
	f := frame{typ: head[0], channel: binary.BigEndian.Uint16(head[1:3])}
	size := binary.BigEndian.Uint32(head[3:7])
	if int64(size) > int64(frameMax-8) {
		return frame{}, fmt.Errorf("%w: %d bytes, larger than the negotiated frame_max %d", errBadFrame, uint64(size)+8, frameMax)
	}
	f.payload = make([]byte, size+1)
	if _, err := io.ReadFull(r, f.payload); err != nil {
		return frame{}, err
	}
	if f.payload[size] != frameEnd {
		return frame{}, fmt.Errorf("%w: bad frame end 0x%02x", errBadFrame, f.payload[size])
	}
	f.payload = f.payload[:size]
	return f, nil
}

// amqpError is a failure the broker reports to its client: a channel error
// closes the AMQP channel, a connection error the whole connection.
type amqpError struct {
	code       uint16
	text       string
	cause      method // the method that failed, 0 if none
	connection bool
}

func (e *amqpError) Error() string { return fmt.Sprintf("%d %s", e.code, e.text) }

// channelError returns a channel error with RabbitMQ's wording, which
// prefixes the text with the code's name.
func channelError(code uint16, cause method, format string, args ...any) *amqpError {
	return &amqpError{code: code, text: replyName(code) + " - " + fmt.Sprintf(format, args...), cause: cause}
}

// connectionError is like channelError, for errors that end the connection.
func connectionError(code uint16, cause method, format string, args ...any) *amqpError {
	e := channelError(code, cause, format, args...)
	e.connection = true
	return e
}

// replyName returns the constant name of a reply code.
func replyName(code uint16) string {
	switch code {
	case replyConnectionForced:
		return "CONNECTION_FORCED"
	case replyAccessRefused:
		return "ACCESS_REFUSED"
	case replyNotFound:
		return "NOT_FOUND"
	case replyResourceLocked:
		return "RESOURCE_LOCKED"
	case replyPreconditionFailed:
		return "PRECONDITION_FAILED"
	case replyFrameError:
		return "FRAME_ERROR"
	case replySyntaxError:
		return "SYNTAX_ERROR"
	case replyCommandInvalid:
		return "COMMAND_INVALID"
	case replyChannelError:
		return "CHANNEL_ERROR"
	case replyUnexpectedFrame:
		return "UNEXPECTED_FRAME"
	case replyNotAllowed:
		return "NOT_ALLOWED"
	case replyNotImplemented:
		return "NOT_IMPLEMENTED"
	}
	return "INTERNAL_ERROR"
}
