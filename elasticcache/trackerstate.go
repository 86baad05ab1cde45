package elasticcache

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
)

// trackerStateVersion is the format of MarshalBinary's output.
const trackerStateVersion = 1

// MarshalBinary writes the tracker's whole state (its setting included), so that a
// conversation kept outside the process (a disk tier) continues with the tracker
// that compressed it. The format is versioned; UnmarshalBinary reads it back.
func (t *Tracker) MarshalBinary() ([]byte, error) {
	cfg, err := json.Marshal(t.spec.Config())
	if err != nil {
		return nil, err
	}
	b := binary.LittleEndian.AppendUint32(nil, trackerStateVersion)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(cfg)))
	b = append(b, cfg...)
	flags := uint32(0)
	if t.planned {
		flags = 1
	}
	for _, v := range []int{t.nLayers, t.textFrom, int(flags), t.promptN, t.kept, t.merged, t.evicted, t.sinkHeld, t.point, t.refHeld, len(t.acc)} {
		b = binary.LittleEndian.AppendUint64(b, uint64(int64(v)))
	}
	for _, a := range t.acc {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(a))
	}
	return b, nil
}

// TrackerStateError is tracker state UnmarshalBinary cannot read.
type TrackerStateError struct{ Msg string }

func (e *TrackerStateError) Error() string { return "elasticcache: tracker state: " + e.Msg }

// UnmarshalBinary replaces the tracker's state with one MarshalBinary wrote; the
// setting it holds must be valid. On error the tracker is unchanged.
func (t *Tracker) UnmarshalBinary(b []byte) error {
	bad := func(f string, a ...any) error { return &TrackerStateError{Msg: fmt.Sprintf(f, a...)} }
	if len(b) < 8 {
		return bad("%d bytes", len(b))
	}
	if v := binary.LittleEndian.Uint32(b); v != trackerStateVersion {
		return bad("version %d, this build reads %d", v, trackerStateVersion)
	}
	n := int(binary.LittleEndian.Uint32(b[4:]))
	if n > len(b)-8 {
		return bad("a setting of %d bytes in %d", n, len(b)-8)
	}
	var cfg Config
	if err := json.Unmarshal(b[8:8+n], &cfg); err != nil {
		return bad("setting: %v", err)
	}
	spec, err := cfg.Spec()
	if err != nil {
		return bad("setting: %v", err)
	}
	rest := b[8+n:]
	const fields = 11
	if len(rest) < 8*fields {
		return bad("%d bytes of counters, want %d", len(rest), 8*fields)
	}
	v := make([]int, fields)
	for i := range v {
		v[i] = int(int64(binary.LittleEndian.Uint64(rest[8*i:])))
	}
	rest = rest[8*fields:]
	nAcc := v[10]
	if nAcc < 0 || nAcc != len(rest)/8 || len(rest)%8 != 0 {
		return bad("%d scores in %d bytes", nAcc, len(rest))
	}
	if v[0] < 1 {
		return bad("%d layers", v[0])
	}
	var acc []float64
	for i := range nAcc {
		acc = append(acc, math.Float64frombits(binary.LittleEndian.Uint64(rest[8*i:])))
	}
	*t = Tracker{spec: spec, nLayers: v[0], textFrom: v[1], planned: v[2]&1 != 0, promptN: v[3], kept: v[4], merged: v[5],
		evicted: v[6], sinkHeld: v[7], point: v[8], refHeld: v[9], acc: acc}
	return nil
}
