package engine

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// The disk tier keeps conversations in files under --cache-dir so that they
// survive a restart: conversations that leave the host tier (or leave their slot
// when the host tier is off), and at a clean shutdown every conversation held in
// a slot or in host memory. A later turn that continues one is restored from its
// file as from host memory. Each file names the model (ModelIdentity), the cache
// setting and a format version and ends with a checksum; one that does not match,
// is truncated or corrupt is ignored (counted, logged once) and the turn is
// encoded afresh. The directory is bounded (--cache-dir-mb, least recently used
// files out first) and written atomically (a temporary file, then rename). One
// server uses a directory at a time: a second one finds it locked and runs
// without the disk tier (logged, DiskCacheOff).

// diskEntry indexes one file: its conversation's key, without cells.
type diskEntry struct {
	name       string
	units      []unit
	spec       elasticcache.Spec
	size       int64
	used       uint64
	compressed bool
	cells      int // entries (cache part 0)
}

func (d *diskEntry) serves(s *seq) int {
	return continuesUnits(d.units, d.spec, d.compressed, s)
}

// diskTier is the directory and its index.
//
// Locking: mu guards the index and the pending writes (the loop looks up and
// reads; the writer goroutine adds and removes); counters are atomics, read by
// Stats.
type diskTier struct {
	dir   string
	limit int64
	model [32]byte
	log   zerolog.Logger
	lock  *os.File

	mu    sync.Mutex
	index map[string]*diskEntry
	clock uint64
	// pending are the conversations queued for the writer, by file name: they
	// serve a request like their file will (a conversation that left its slot a
	// moment ago is not lost to a slow disk), newer than a file of the same name.
	pending map[string]*pendingWrite

	writes chan *pendingWrite
	done   sync.WaitGroup
	warned atomic.Bool
	// device, when set, stands between a file and what is written to it: a test
	// gives it a disk that fills up. Set before the first write is queued.
	device func(io.Writer) io.Writer

	tierCounters
}

// ModelIdentity names the model a conversation file belongs to: SHA-256 over
// each GGUF file's size, its header (metadata and tensor layout: everything
// before the tensor data) and 64 samples of its tensor data, so that the same
// files give the same identity and another model (or the same layout with other
// weights) another one.
func ModelIdentity(paths ...string) ([32]byte, error) {
	h := sha256.New()
	for _, p := range paths {
		if p == "" {
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			return [32]byte{}, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return [32]byte{}, err
		}
		dataAt, err := ggufDataOffset(f)
		if err != nil {
			f.Close()
			return [32]byte{}, fmt.Errorf("engine: %s: %w", p, err)
		}
		fmt.Fprintf(h, "%d\n", st.Size())
		if _, err := io.Copy(h, io.NewSectionReader(f, 0, dataAt)); err != nil {
			f.Close()
			return [32]byte{}, err
		}
		const samples, chunk = 64, 4096
		if span := st.Size() - dataAt; span > 0 {
			buf := make([]byte, chunk)
			for i := range int64(samples) {
				n, _ := f.ReadAt(buf, dataAt+span*i/samples)
				h.Write(buf[:n])
			}
		}
		f.Close()
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out, nil
}

// openDiskTier takes dir (created if missing) for this process and indexes the
// conversation files of model there. A directory another server holds is
// refused (*DiskLockedError).
func openDiskTier(dir string, limit int64, model [32]byte, log zerolog.Logger) (*diskTier, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, &DiskLockedError{Dir: dir}
	}
	d := &diskTier{dir: dir, limit: limit, model: model, log: log, lock: lock, index: map[string]*diskEntry{}, pending: map[string]*pendingWrite{}, writes: make(chan *pendingWrite, 64)}
	names, err := os.ReadDir(dir)
	if err != nil {
		d.close()
		return nil, err
	}
	for _, de := range names {
		name := de.Name()
		switch {
		case strings.HasPrefix(name, ".tmp-"):
			os.Remove(filepath.Join(dir, name)) // a write a crash interrupted
		case strings.HasSuffix(name, diskExt):
			info, err := de.Info()
			if err != nil {
				continue
			}
			e, err := readHeader(filepath.Join(dir, name), model)
			if err != nil {
				d.fault(err)
				continue
			}
			d.clock++
			d.index[name] = &diskEntry{name: name, units: e.units, spec: e.spec, compressed: e.compressed, cells: e.cells, size: info.Size(), used: d.clock}
			d.bytes.Add(info.Size())
			d.count.Add(1)
		}
	}
	d.done.Add(1)
	go d.writer()
	return d, nil
}

// DiskLockedError is a cache directory another server is using.
type DiskLockedError struct{ Dir string }

func (e *DiskLockedError) Error() string {
	return "engine: cache directory " + e.Dir + " is in use by another server"
}

func (d *diskTier) on() bool { return d != nil }

// fault counts a file or write that failed; the first is logged.
func (d *diskTier) fault(err error) {
	d.bad.Add(1)
	if d.warned.CompareAndSwap(false, true) {
		d.log.Warn().Err(err).Msg("disk tier: a conversation file could not be used or written (logged once; see elasticserve_kv_tier_failures_total)")
	}
}

// pendingWrite is a conversation queued for the writer.
type pendingWrite struct {
	name string
	e    *hostEntry
}

// detached is a copy of e that a request may continue while the writer still
// reads e: the same cells (read only) and a tracker of its own.
func (e *hostEntry) detached() (*hostEntry, error) {
	c := *e
	if e.tracker != nil {
		b, err := e.tracker.MarshalBinary()
		if err != nil {
			return nil, err
		}
		c.tracker = &elasticcache.Tracker{}
		if err := c.tracker.UnmarshalBinary(b); err != nil {
			return nil, err
		}
	}
	return &c, nil
}

// put queues e to be written; when the queue is full the conversation is lost
// (counted).
func (d *diskTier) put(e *hostEntry) {
	if !d.on() {
		return
	}
	w := &pendingWrite{name: diskName(e), e: e}
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case d.writes <- w:
		d.pending[w.name] = w
	default:
		d.fault(errors.New("the write queue is full"))
	}
}

func (d *diskTier) writer() {
	defer d.done.Done()
	for w := range d.writes {
		d.write(w.name, w.e)
		d.mu.Lock()
		if d.pending[w.name] == w {
			delete(d.pending, w.name)
		}
		d.mu.Unlock()
	}
}

// write stores e in its file atomically, indexes it and keeps the directory
// within its bound. A failure (a full disk, a directory that became read-only)
// is counted and leaves no partial file.
func (d *diskTier) write(name string, e *hostEntry) {
	tmp, err := os.CreateTemp(d.dir, ".tmp-*")
	if err != nil {
		d.fault(err)
		return
	}
	var out io.Writer = tmp
	if d.device != nil {
		out = d.device(tmp)
	}
	err = writeEntry(out, d.model, e)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	var size int64
	if err == nil {
		var st os.FileInfo
		if st, err = os.Stat(tmp.Name()); err == nil {
			size = st.Size()
		}
	}
	if err == nil && d.limit > 0 && size > d.limit {
		err = fmt.Errorf("a conversation of %d bytes exceeds the directory's bound of %d", size, d.limit)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(d.dir, name))
	}
	if err != nil {
		os.Remove(tmp.Name())
		d.fault(err)
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if old := d.index[name]; old != nil {
		d.bytes.Add(-old.size)
		d.count.Add(-1)
	}
	d.clock++
	d.index[name] = &diskEntry{name: name, units: e.units, spec: e.spec, compressed: e.compressed, cells: e.snap.Cells(), size: size, used: d.clock}
	d.bytes.Add(size)
	d.count.Add(1)
	d.stored.Add(1)
	for d.limit > 0 && d.bytes.Load() > d.limit {
		var lru *diskEntry
		for _, x := range d.index {
			if lru == nil || x.used < lru.used {
				lru = x
			}
		}
		d.dropLocked(lru)
		d.evictions.Add(1)
	}
}

func (d *diskTier) dropLocked(x *diskEntry) {
	os.Remove(filepath.Join(d.dir, x.name))
	delete(d.index, x.name)
	d.bytes.Add(-x.size)
	d.count.Add(-1)
}

// best is the indexed conversation that serves the most of s's prompt, at least
// half of what it holds (a copy of its index entry), and how much it serves; nil
// when none.
func (d *diskTier) best(s *seq) (*diskEntry, int) {
	if !d.on() || !s.reuse {
		return nil, 0
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var best *diskEntry
	bestN := 0
	for _, w := range d.pending {
		x := &diskEntry{name: w.name, units: w.e.units, spec: w.e.spec, compressed: w.e.compressed, cells: w.e.snap.Cells()}
		if n := x.serves(s); n > bestN && 2*n >= len(x.units) {
			best, bestN = x, n
		}
	}
	for _, x := range d.index {
		if d.pending[x.name] != nil {
			continue // older than the pending write
		}
		if n := x.serves(s); n > bestN && 2*n >= len(x.units) {
			best, bestN = x, n
		}
	}
	if best == nil {
		return nil, 0
	}
	c := *best
	return &c, bestN
}

// load reads the conversation in file name, checked whole. A file that cannot be
// used is counted and forgotten (and removed: it can never serve). A conversation
// still queued for the writer is taken as it is in memory, without waiting for a
// slow disk: the writer and the restore only read its cells, and the request
// goes on with a copy of its tracker.
func (d *diskTier) load(name string) (*hostEntry, error) {
	d.mu.Lock()
	w := d.pending[name]
	d.mu.Unlock()
	if w != nil {
		return w.e.detached()
	}
	e, err := readEntry(filepath.Join(d.dir, name), d.model)
	d.mu.Lock()
	defer d.mu.Unlock()
	x := d.index[name]
	if err != nil {
		d.fault(err)
		if x != nil {
			d.dropLocked(x)
		}
		return nil, err
	}
	if x != nil {
		d.clock++
		x.used = d.clock
	}
	return e, nil
}

func (d *diskTier) empty() bool {
	if !d.on() {
		return true
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.index) == 0 && len(d.pending) == 0
}

// close waits for the queued writes and releases the directory.
func (d *diskTier) close() {
	if d.writes != nil {
		close(d.writes)
		d.done.Wait()
		d.writes = nil
	}
	if d.lock != nil {
		d.lock.Close() // releases the flock
		d.lock = nil
	}
}

// persist writes every conversation held in a slot or in the host tier to the
// disk tier, then closes it (waiting for queued writes). Stop calls it once the
// decode loop is done, before the contexts are freed.
func (e *Engine) persist() {
	d := e.disk
	if d == nil {
		return
	}
	for _, h := range e.held {
		if h != nil && len(h.cache.cells) > 0 {
			if ent := e.snapshot(h); ent != nil {
				d.write(diskName(ent), ent)
			}
		}
	}
	for _, ent := range e.host.entries {
		d.write(diskName(ent), ent)
	}
	d.close()
}
