package main

// Dropping duplicates, for the AMQP plugin. The posts' consumer handed
// every delivery to the bus; a bridge that republishes what the broker did
// not confirm (after a lost connection) can put one line on the exchange
// twice, and must show it once.

import (
	"crypto/sha256"
	"strconv"
	"strings"
)

// Bounds on what dedupe remembers; each is far above what a genuine
// producer needs, and together they bound its memory (about 40 KiB a
// producer, 10 MiB in all) whatever anyone publishes.
const (
	// dedupeWindow is how many of a producer's latest sequence numbers
	// keep their body's hash: far more than can be republished at once
	// (one publish batch, maxBatch, per reconnection).
	dedupeWindow = 1024
	// dedupeAhead bounds the sequence numbers held above a producer's
	// watermark, waiting for the ones before them.
	dedupeAhead = 256
	// dedupeProducers bounds the producers remembered; the one seen
	// longest ago is forgotten first.
	dedupeProducers = 256
)

// dedupe tells which deliveries repeat a message already handed to the
// bus. A wsamqp message id is "<producer>-<sequence>", and a producer
// numbers its messages 1, 2, 3, ... in the order it publishes them, so
// every process drops exactly the same copies:
//
//   - Per producer it keeps a watermark: the highest n such that 1..n
//     have all been seen. Anything at or below it was seen, with no
//     window that a slow consumer could outrun.
//   - A copy counts as a duplicate only if its body is the one seen under
//     that number (compared by SHA-256): a message that merely claims an
//     id it did not earn, even a future one, never suppresses the real
//     one. Below the hash window, numbers are all taken and copies are
//     dropped.
//   - Numbers seen above the watermark wait in a bounded set until the
//     gap closes; a gap that never closes (a message dropped by a full
//     queue) is skipped once the set is full.
//
// It is used by the consuming goroutine only.
type dedupe struct {
	producers map[string]*producerSeen
	clock     uint64 // counts deliveries, to forget the producer seen longest ago
}

// producerSeen is what dedupe remembers of one producer.
type producerSeen struct {
	watermark uint64                       // 1..watermark have all been seen
	hashes    map[uint64][sha256.Size]byte // body hashes of the numbers seen in the window and above it
	ahead     int                          // how many of hashes are above the watermark
	lastSeen  uint64
}

func newDedupe() *dedupe { return &dedupe{producers: make(map[string]*producerSeen)} }

// duplicate reports whether the message with id and body was seen before,
// and remembers it. An id that is not a wsamqp id is never a duplicate.
func (d *dedupe) duplicate(id string, body []byte) bool {
	i := strings.LastIndexByte(id, '-')
	if i <= 0 {
		return false
	}
	seq, err := strconv.ParseUint(id[i+1:], 36, 64)
	if err != nil || seq == 0 {
		return false
	}
	p := d.producer(id[:i])
	sum := sha256.Sum256(body)
	if old, ok := p.hashes[seq]; ok {
		if old == sum {
			return true
		}
		p.hashes[seq] = sum // the earlier one claimed a number it did not earn
		return false
	}
	if seq <= p.watermark {
		return true // older than the hash window: long since delivered
	}
	p.hashes[seq] = sum
	p.ahead++
	p.advance()
	return false
}

// producer returns what is remembered of the producer called name,
// forgetting the one seen longest ago if there are too many.
func (d *dedupe) producer(name string) *producerSeen {
	d.clock++
	p, ok := d.producers[name]
	if !ok {
		if len(d.producers) >= dedupeProducers {
			var oldest string
			for n, q := range d.producers {
				if oldest == "" || q.lastSeen < d.producers[oldest].lastSeen {
					oldest = n
				}
			}
			delete(d.producers, oldest)
		}
		p = &producerSeen{hashes: make(map[uint64][sha256.Size]byte)}
		d.producers[name] = p
	}
	p.lastSeen = d.clock
	return p
}

// advance moves the watermark over the numbers seen, forgetting hashes
// that fall below the window, and skips a gap that has waited too long.
func (p *producerSeen) advance() {
	for {
		for {
			if _, ok := p.hashes[p.watermark+1]; !ok {
				break
			}
			p.watermark++
			p.ahead--
			if p.watermark > dedupeWindow {
				delete(p.hashes, p.watermark-dedupeWindow)
			}
		}
		if p.ahead <= dedupeAhead {
			return
		}
		// The gap above the watermark is not closing: what is missing was
		// lost (a full queue dropped it). Move past it, and forget what
		// the jump left below the window. Rare, so a walk is fine.
		lowest := uint64(0)
		for n := range p.hashes {
			if n > p.watermark && (lowest == 0 || n < lowest) {
				lowest = n
			}
		}
		p.watermark = lowest - 1
		for n := range p.hashes {
			if n+dedupeWindow <= p.watermark {
				delete(p.hashes, n)
			}
		}
	}
}
