package main

// Packs: several browser messages in one AMQP message. The posts put
// each browser message on the exchange as a message of its own, and a
// broker pays for every message it takes, stores and delivers, whatever
// its size: at thousands of lines a second, RabbitMQ spent more CPU on
// them than the bridge did. So when more than one message of a room is
// waiting for the broker, they go out together, in a pack: the broker
// pays once for all of them. A message alone goes out as it is, as in the
// posts, and any AMQP client may still publish plain messages; a pack
// says what it is in its content type.
//
// A pack's body is its messages, one after another, each as
//
//	uvarint len(id) | id | uvarint received | uvarint len(body) | body
//
// where id is the message's wsamqp id (for dropping duplicates) and
// received is when it reached its bridge, in Unix nanoseconds.
//
// Offsets. The stream numbers AMQP messages, so the messages of a pack
// share one stream offset; a line's offset, as browsers see it, is its
// AMQP message's stream offset times packSlots plus its place in the pack
// (0 for a plain message). Line offsets go up as the stream's do, and
// stay below 2^53, exact in JavaScript, for the first 2^45 stream
// offsets.

import (
	"encoding/binary"
	"errors"
)

// packContentType is the content type of a pack.
const packContentType = "application/vnd.wsamqp.pack"

// Bounds on a pack: at most packSlots messages (a line offset has room
// for no more), and about packBytes of them, unless one is larger.
const (
	packSlots = 256
	packBytes = 1 << 20
)

// lineOffset is the offset browsers see for the message at place i in the
// AMQP message at stream offset offset.
func lineOffset(offset int64, i int) int64 { return offset*packSlots + int64(i) }

// streamOffsetOf is the stream offset of the AMQP message that holds the
// line at line offset lo.
func streamOffsetOf(lo int64) int64 { return lo / packSlots }

// packs splits msgs, all of one room and in order, into the groups that
// go out as one AMQP message each: a message alone, or a pack.
func packs(msgs []outgoing) [][]outgoing {
	var groups [][]outgoing
	for len(msgs) > 0 {
		n, size := 1, len(msgs[0].body)
		for n < len(msgs) && n < packSlots && size+len(msgs[n].body) <= packBytes {
			size += len(msgs[n].body)
			n++
		}
		groups = append(groups, msgs[:n:n])
		msgs = msgs[n:]
	}
	return groups
}

// appendPack appends the pack of msgs to dst.
func appendPack(dst []byte, msgs []outgoing) []byte {
	for _, m := range msgs {
		dst = binary.AppendUvarint(dst, uint64(len(m.id)))
		dst = append(dst, m.id...)
		dst = binary.AppendUvarint(dst, uint64(m.received))
		dst = binary.AppendUvarint(dst, uint64(len(m.body)))
		dst = append(dst, m.body...)
	}
	return dst
}

// packed is one message read from a pack; its slices point into the
// pack.
type packed struct {
	id       string
	received int64
	body     []byte
}

// errBadPack says a pack's body does not parse, or holds too many
// messages.
var errBadPack = errors.New("malformed pack")

// unpack reads a pack's messages. Its time is linear in the pack's size;
// a pack that does not parse, or holds more than packSlots messages, is
// refused whole.
func unpack(b []byte) ([]packed, error) {
	var msgs []packed
	field := func() ([]byte, bool) {
		n, k := binary.Uvarint(b)
		if k <= 0 || n > uint64(len(b)-k) {
			return nil, false
		}
		f := b[k : k+int(n)]
		b = b[k+int(n):]
		return f, true
	}
	for len(b) > 0 {
		if len(msgs) == packSlots {
			return nil, errBadPack
		}
		id, ok := field()
		if !ok {
			return nil, errBadPack
		}
		received, k := binary.Uvarint(b)
		if k <= 0 {
			return nil, errBadPack
		}
		b = b[k:]
		body, ok := field()
		if !ok {
			return nil, errBadPack
		}
		msgs = append(msgs, packed{id: string(id), received: int64(received), body: body})
	}
	if len(msgs) == 0 {
		return nil, errBadPack
	}
	return msgs, nil
}
