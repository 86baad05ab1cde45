package engine

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// A conversation file (the disk tier) holds one hostEntry, little endian:
//
//	magic "ESKVCONV", version u32, model identity [32], header length u64,
//	header: setting (u32 length + Config JSON), compressed u8, cells u32, units (u32 count,
//	  then per unit the image key [32] and the token i32), tracker state
//	  (u32 length + elasticcache.Tracker.MarshalBinary; 0 when uncompressed);
//	payload: parts u32, per part: layers u32, per layer its LayerLayout (7 x i32,
//	  v_trans u8), cells u32 and per cell index, pos, x, y (i32), then per layer the
//	  K bytes and the V bytes (u64 length + bytes);
//	SHA-256 of everything before it.
//
// A file is read whole and checked (magic, version, model, checksum, every
// length) before anything of it is used; the header alone is read to index the
// directory at start.
const (
	diskMagic   = "ESKVCONV"
	diskVersion = 1
	diskExt     = ".eskv"
)

// DiskFileError is a conversation file that cannot be used: not one, another
// version or model, truncated, or its checksum does not match.
type DiskFileError struct {
	Path, Msg string
}

func (e *DiskFileError) Error() string { return "engine: conversation file " + e.Path + ": " + e.Msg }

// diskName is the file name of a conversation: its key (units, setting,
// compressed) hashed, so that the same conversation overwrites its file.
func diskName(e *hostEntry) string {
	h := sha256.New()
	cfg, _ := json.Marshal(e.spec.Config())
	h.Write(cfg)
	if e.compressed {
		h.Write([]byte{1})
	}
	var b [36]byte
	for _, u := range e.units {
		copy(b[:32], u.img[:])
		binary.LittleEndian.PutUint32(b[32:], uint32(u.tok))
		h.Write(b[:])
	}
	return hex.EncodeToString(h.Sum(nil)[:20]) + diskExt
}

type leWriter struct {
	w   io.Writer
	err error
}

func (w *leWriter) bytes(b []byte) {
	if w.err == nil {
		_, w.err = w.w.Write(b)
	}
}
func (w *leWriter) u8(v uint8)   { w.bytes([]byte{v}) }
func (w *leWriter) u32(v uint32) { w.bytes(binary.LittleEndian.AppendUint32(nil, v)) }
func (w *leWriter) i32(v int)    { w.u32(uint32(int32(v))) }
func (w *leWriter) u64(v uint64) { w.bytes(binary.LittleEndian.AppendUint64(nil, v)) }
func (w *leWriter) blob32(b []byte) {
	w.u32(uint32(len(b)))
	w.bytes(b)
}

// encodeHeader is the header section of e.
func encodeHeader(e *hostEntry) ([]byte, error) {
	var buf bytes.Buffer
	w := &leWriter{w: &buf}
	cfg, err := json.Marshal(e.spec.Config())
	if err != nil {
		return nil, err
	}
	w.blob32(cfg)
	if e.compressed {
		w.u8(1)
	} else {
		w.u8(0)
	}
	w.u32(uint32(e.snap.Cells()))
	w.u32(uint32(len(e.units)))
	for _, u := range e.units {
		w.bytes(u.img[:])
		w.i32(int(u.tok))
	}
	var tr []byte
	if e.tracker != nil {
		if tr, err = e.tracker.MarshalBinary(); err != nil {
			return nil, err
		}
	}
	w.blob32(tr)
	return buf.Bytes(), w.err
}

// writeEntry writes e as a conversation file of model to out.
func writeEntry(out io.Writer, model [32]byte, e *hostEntry) error {
	hdr, err := encodeHeader(e)
	if err != nil {
		return err
	}
	sum := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(out, sum), 1<<20)
	w := &leWriter{w: bw}
	w.bytes([]byte(diskMagic))
	w.u32(diskVersion)
	w.bytes(model[:])
	w.u64(uint64(len(hdr)))
	w.bytes(hdr)
	w.u32(uint32(len(e.snap.Parts)))
	for _, p := range e.snap.Parts {
		w.u32(uint32(len(p.Layers)))
		for _, l := range p.Layers {
			for _, v := range []int{l.Layer, int(l.TypeK), int(l.TypeV), l.WidthK, l.WidthV, l.BytesK, l.BytesV} {
				w.i32(v)
			}
			if l.VTrans {
				w.u8(1)
			} else {
				w.u8(0)
			}
		}
		w.u32(uint32(len(p.Cells)))
		for _, c := range p.Cells {
			w.i32(c.Index)
			w.i32(c.Pos)
			w.i32(c.X)
			w.i32(c.Y)
		}
		for l := range p.Layers {
			w.u64(uint64(len(p.K[l])))
			w.bytes(p.K[l])
			w.u64(uint64(len(p.V[l])))
			w.bytes(p.V[l])
		}
	}
	if w.err != nil {
		return w.err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	_, err = out.Write(sum.Sum(nil))
	return err
}

// leReader reads what leWriter wrote from a byte slice, failing (once) on any
// read past its end.
type leReader struct {
	b   []byte
	err error
}

func (r *leReader) take(n int) []byte {
	if r.err != nil || n < 0 || n > len(r.b) {
		if r.err == nil {
			r.err = fmt.Errorf("truncated: %d bytes wanted, %d left", n, len(r.b))
		}
		return nil
	}
	out := r.b[:n:n]
	r.b = r.b[n:]
	return out
}

func (r *leReader) u8() uint8 {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *leReader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *leReader) i32() int { return int(int32(r.u32())) }

func (r *leReader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

// count reads a u32 count of items of at least min bytes each that must fit in
// what is left (so a damaged count cannot make a huge allocation).
func (r *leReader) count(min int) int {
	n := int(r.u32())
	if r.err == nil && n*max(min, 1) > len(r.b) {
		r.err = fmt.Errorf("a count of %d does not fit in %d bytes", n, len(r.b))
		return 0
	}
	return n
}

// decodeHeader reads the header section into an entry without cells.
func decodeHeader(b []byte) (*hostEntry, error) {
	r := &leReader{b: b}
	var cfg elasticcache.Config
	if err := json.Unmarshal(r.take(r.count(1)), &cfg); r.err == nil && err != nil {
		return nil, fmt.Errorf("setting: %w", err)
	}
	if r.err != nil {
		return nil, r.err
	}
	spec, err := cfg.Spec()
	if err != nil {
		return nil, fmt.Errorf("setting: %w", err)
	}
	e := &hostEntry{spec: spec, compressed: r.u8() == 1}
	e.cells = int(r.u32())
	n := r.count(36)
	e.units = make([]unit, 0, n)
	for range n {
		var u unit
		copy(u.img[:], r.take(32))
		u.tok = llama.Token(r.i32())
		e.units = append(e.units, u)
	}
	tr := r.take(r.count(1))
	if r.err != nil {
		return nil, r.err
	}
	if len(tr) > 0 {
		e.tracker = &elasticcache.Tracker{}
		if err := e.tracker.UnmarshalBinary(tr); err != nil {
			return nil, err
		}
		if e.tracker.Spec() != spec {
			return nil, fmt.Errorf("the tracker's setting is not the conversation's")
		}
	}
	if e.compressed != (e.tracker != nil) {
		return nil, fmt.Errorf("a compressed conversation needs its tracker, and only it")
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("%d bytes after the header", len(r.b))
	}
	return e, nil
}

// readHeader reads the header of the conversation file at path: the entry
// without its cells, or a DiskFileError.
func readHeader(path string, model [32]byte) (*hostEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fixed := make([]byte, len(diskMagic)+4+32+8)
	if _, err := io.ReadFull(f, fixed); err != nil {
		return nil, &DiskFileError{path, "truncated before its header"}
	}
	hlen, err := checkFixed(path, fixed, model)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if hlen > uint64(st.Size()) {
		return nil, &DiskFileError{path, fmt.Sprintf("a header of %d bytes in a file of %d", hlen, st.Size())}
	}
	hdr := make([]byte, hlen)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return nil, &DiskFileError{path, "truncated header"}
	}
	e, err := decodeHeader(hdr)
	if err != nil {
		return nil, &DiskFileError{path, err.Error()}
	}
	return e, nil
}

// checkFixed checks the fixed start of a file and returns its header length.
func checkFixed(path string, fixed []byte, model [32]byte) (uint64, error) {
	r := &leReader{b: fixed}
	if string(r.take(len(diskMagic))) != diskMagic {
		return 0, &DiskFileError{path, "not a conversation file"}
	}
	if v := r.u32(); v != diskVersion {
		return 0, &DiskFileError{path, fmt.Sprintf("format version %d, this build reads %d", v, diskVersion)}
	}
	if m := r.take(32); !bytes.Equal(m, model[:]) {
		return 0, &DiskFileError{path, "written for another model"}
	}
	return r.u64(), nil
}

// readEntry reads and checks the whole conversation file at path.
func readEntry(path string, model [32]byte) (*hostEntry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	bad := func(f string, a ...any) error { return &DiskFileError{path, fmt.Sprintf(f, a...)} }
	fixedLen := len(diskMagic) + 4 + 32 + 8
	if len(data) < fixedLen+sha256.Size {
		return nil, bad("truncated (%d bytes)", len(data))
	}
	body, sum := data[:len(data)-sha256.Size], data[len(data)-sha256.Size:]
	if got := sha256.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, bad("checksum mismatch")
	}
	hlen, err := checkFixed(path, body[:fixedLen], model)
	if err != nil {
		return nil, err
	}
	if hlen > uint64(len(body)-fixedLen) {
		return nil, bad("a header of %d bytes in %d", hlen, len(body)-fixedLen)
	}
	e, err := decodeHeader(body[fixedLen : fixedLen+int(hlen)])
	if err != nil {
		return nil, bad("%v", err)
	}
	r := &leReader{b: body[fixedLen+int(hlen):]}
	snap := &llama.CellSnapshot{}
	for range r.count(8) {
		var p llama.PartSnapshot
		for range r.count(29) {
			var l llama.LayerLayout
			l.Layer, l.TypeK, l.TypeV = r.i32(), int32(r.i32()), int32(r.i32())
			l.WidthK, l.WidthV, l.BytesK, l.BytesV = r.i32(), r.i32(), r.i32(), r.i32()
			l.VTrans = r.u8() == 1
			p.Layers = append(p.Layers, l)
		}
		for range r.count(16) {
			p.Cells = append(p.Cells, llama.Cell{Index: r.i32(), Pos: r.i32(), X: r.i32(), Y: r.i32()})
		}
		for range p.Layers {
			p.K = append(p.K, r.take(int(min(r.u64(), uint64(len(r.b)+1)))))
			p.V = append(p.V, r.take(int(min(r.u64(), uint64(len(r.b)+1)))))
		}
		snap.Parts = append(snap.Parts, p)
	}
	if r.err != nil {
		return nil, bad("%v", r.err)
	}
	if len(r.b) != 0 {
		return nil, bad("%d bytes after the cells", len(r.b))
	}
	if len(snap.Parts) == 0 || snap.Cells() == 0 || snap.Cells() != e.cells {
		return nil, bad("%d cells, the header says %d", snap.Cells(), e.cells)
	}
	e.snap = snap
	e.bytes = snap.Bytes() + int64(len(e.units))*unitBytes
	return e, nil
}
