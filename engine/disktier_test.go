package engine

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// testModelID is ModelIdentity of the test model's files.
func testModelID(t *testing.T) [32]byte {
	t.Helper()
	mp, vp, err := testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	id, err := ModelIdentity(mp, vp)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func diskEngine(t *testing.T, dir string, id [32]byte, limit int64) *testEngine {
	return startEngine(t, Options{Parallel: 1, Reuse: true, ReuseCompressed: true, ImageCacheBytes: 64 << 20,
		HostCacheBytes: 256 << 20, CacheDir: dir, CacheDirBytes: limit, ModelID: id})
}

// stopClean stops e as SIGTERM does, letting it finish (and persist).
func stopClean(e *testEngine) {
	e.Stop(context.Background())
}

func convFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*"+diskExt))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// A conversation held at a clean shutdown is written to the cache directory and
// restored from it by the next server: its second turn continues it as if it had
// stayed in its slot (full and elastic 0.5).
func TestDiskTierSurvivesARestart(t *testing.T) {
	id := testModelID(t)
	if id2 := testModelID(t); id2 != id {
		t.Fatal("the model's identity changes between two reads")
	}
	for _, tc := range []struct {
		name string
		spec elasticcache.Spec
	}{{"full", elasticcache.Spec{}}, {"elastic-0.5", cfg(elasticcache.Elastic, 0.5)}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			e := diskEngine(t, dir, id, 0)
			first := pictureTurn1("a", tc.spec, testPNG(t, 1))
			a1 := run(t, e, first)
			stopClean(e)
			if files := convFiles(t, dir); len(files) != 1 {
				t.Fatalf("%d conversation files after a clean shutdown", len(files))
			}
			second := turn2(first, a1.text, "And which color is it?")
			e2 := diskEngine(t, dir, id, 0)
			if st := e2.Stats(); st.DiskCache.Entries != 1 || st.DiskCacheOff {
				t.Fatalf("the restarted server indexed %+v", st)
			}
			a2 := run(t, e2, second)
			ref := hostEngine(t, 0)
			run(t, ref, first)
			r2 := run(t, ref, second)
			if a2.kv.ReusedFrom != "disk" || a2.usage.CachedTokens != r2.usage.CachedTokens || a2.text != r2.text {
				t.Fatalf("after the restart: %q cached %d from %q; held in its slot %q cached %d",
					a2.text, a2.usage.CachedTokens, a2.kv.ReusedFrom, r2.text, r2.usage.CachedTokens)
			}
			if st := e2.Stats(); st.DiskCache.Hits != 1 || st.DiskCache.RestoredTokens != int64(a2.usage.CachedTokens) || st.DiskCache.Failures != 0 {
				t.Fatalf("disk tier stats %+v", st)
			}
		})
	}
}

// Files that cannot be used are ignored (counted), the turn is encoded afresh
// and answers as without reuse: every file corrupted, truncated, or of another
// model.
func TestDiskTierIgnoresBadFiles(t *testing.T) {
	id := testModelID(t)
	first := pictureTurn1("a", elasticcache.Spec{}, testPNG(t, 1))
	for _, tc := range []struct {
		name  string
		spoil func(path string) error
	}{
		{"a byte flipped", func(p string) error {
			b, err := os.ReadFile(p)
			if err == nil {
				b[len(b)/2] ^= 0x40
				err = os.WriteFile(p, b, 0o644)
			}
			return err
		}},
		{"truncated", func(p string) error {
			st, err := os.Stat(p)
			if err == nil {
				err = os.Truncate(p, st.Size()/2)
			}
			return err
		}},
		{"garbage", func(p string) error { return os.WriteFile(p, []byte("not a conversation"), 0o644) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			e := diskEngine(t, dir, id, 0)
			a1 := run(t, e, first)
			stopClean(e)
			for _, f := range convFiles(t, dir) {
				if err := tc.spoil(f); err != nil {
					t.Fatal(err)
				}
			}
			second := turn2(first, a1.text, "And which color is it?")
			e2 := diskEngine(t, dir, id, 0)
			got := run(t, e2, second)
			if got.kv.ReusedFrom == "disk" || got.usage.CachedTokens > 10 {
				t.Fatalf("a spoilt file served %d tokens from %q", got.usage.CachedTokens, got.kv.ReusedFrom)
			}
			if want := run(t, e2, noReuse(second)); got.text != want.text {
				t.Fatalf("answer %q, encoded afresh %q", got.text, want.text)
			}
			if st := e2.Stats(); st.DiskCache.Failures < 1 || st.DiskCache.Hits != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
	t.Run("another model", func(t *testing.T) {
		dir := t.TempDir()
		e := diskEngine(t, dir, id, 0)
		a1 := run(t, e, first)
		stopClean(e)
		other := id
		other[0] ^= 1
		e2 := diskEngine(t, dir, other, 0)
		if st := e2.Stats(); st.DiskCache.Entries != 0 || st.DiskCache.Failures != 1 {
			t.Fatalf("another model's file was indexed: %+v", st)
		}
		if got := run(t, e2, turn2(first, a1.text, "And which color is it?")); got.kv.ReusedFrom == "disk" {
			t.Fatal("another model's conversation was restored")
		}
	})
}

// One server per directory: a second one runs without the disk tier. A
// directory that disappears under a running server costs its writes (counted),
// nothing else; one that cannot be made or written turns the tier off. The directory's bound evicts the least recently used file.
func TestDiskTierFaults(t *testing.T) {
	id := testModelID(t)
	dir := t.TempDir()
	e := diskEngine(t, dir, id, 0)
	second := diskEngine(t, dir, id, 0)
	if st := second.Stats(); !st.DiskCacheOff {
		t.Fatalf("a second server on one directory: %+v", st)
	}
	run(t, second, greedyReq("x", "hello", 2, elasticcache.Spec{}))

	// Host tier off: conversations that leave their slot go to disk; then the
	// directory disappears.
	gone := t.TempDir()
	f := startEngine(t, Options{Parallel: 1, Reuse: true, CacheDir: gone, ModelID: id})
	run(t, f, pictureTurn1("a", elasticcache.Spec{}, testPNG(t, 1)))
	if err := os.RemoveAll(gone); err != nil {
		t.Fatal(err)
	}
	run(t, f, pictureTurn1("b", elasticcache.Spec{}, testPNG(t, 2))) // a leaves its slot: its write fails
	stopClean(f)
	if st := f.Stats(); st.DiskCache.Failures < 1 || st.DiskCache.Stored != 0 {
		t.Fatalf("writes into a removed directory: %+v", st)
	}

	// A cache directory that cannot be created or written (its path runs through
	// a regular file; permission bits would not stop a root test run): the server
	// starts without the disk tier, says so in Stats, and serves.
	blocker := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocker, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	unwritable := diskEngine(t, filepath.Join(blocker, "cache"), id, 0)
	if st := unwritable.Stats(); !st.DiskCacheOff {
		t.Fatalf("a cache directory that cannot be made: %+v", st)
	}
	if r := run(t, unwritable, pictureTurn1("u", elasticcache.Spec{}, testPNG(t, 1))); r.usage.CompletionTokens == 0 {
		t.Fatalf("no answer without a usable cache directory: %+v", r)
	}
	stopClean(unwritable)

	// The bound: room for about one conversation.
	run(t, e, pictureTurn1("a", elasticcache.Spec{}, testPNG(t, 1)))
	stopClean(e)
	one := e.Stats().DiskCache.Bytes
	small := t.TempDir()
	g := diskEngine(t, small, id, one*3/2)
	for i := range 3 {
		run(t, g, pictureTurn1(string(rune('a'+i)), elasticcache.Spec{}, testPNG(t, i+1)))
	}
	stopClean(g)
	st := g.Stats()
	if st.DiskCache.Evictions < 1 || st.DiskCache.Bytes > one*3/2 || len(convFiles(t, small)) != int(st.DiskCache.Entries) {
		t.Fatalf("a directory bounded at %d bytes: %+v, %d files", one*3/2, st, len(convFiles(t, small)))
	}
}

// fullDisk takes room bytes, then fails every write as a full file system does.
type fullDisk struct {
	w    io.Writer
	room int
}

func (f *fullDisk) Write(p []byte) (int, error) {
	if len(p) > f.room {
		n, _ := f.w.Write(p[:f.room])
		f.room = 0
		return n, &os.PathError{Op: "write", Path: "conversation", Err: syscall.ENOSPC}
	}
	f.room -= len(p)
	return f.w.Write(p)
}

// A disk that fills up while a conversation is written: the write is counted as
// a failure, no file (not even the partial temporary one) is left, the server
// goes on answering, and the next server on the directory encodes the turn
// afresh with the same answer.
func TestDiskTierFullDisk(t *testing.T) {
	id := testModelID(t)
	dir := t.TempDir()
	e := startEngine(t, Options{Parallel: 1, Reuse: true, CacheDir: dir, ModelID: id})
	e.disk.device = func(w io.Writer) io.Writer { return &fullDisk{w: w, room: 4096} }
	first := pictureTurn1("a", elasticcache.Spec{}, testPNG(t, 1))
	a1 := run(t, e, first)
	run(t, e, pictureTurn1("b", elasticcache.Spec{}, testPNG(t, 2))) // a leaves its slot: its write fails
	stopClean(e)                                                     // b's write at shutdown fails too
	if st := e.Stats(); st.DiskCache.Failures < 2 || st.DiskCache.Stored != 0 || st.DiskCache.Bytes != 0 {
		t.Fatalf("writes to a full disk: %+v", st)
	}
	left, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range left {
		if f.Name() != ".lock" {
			t.Errorf("a full disk left %q in the cache directory", f.Name())
		}
	}

	next := startEngine(t, Options{Parallel: 1, Reuse: true, CacheDir: dir, ModelID: id})
	second := turn2(first, a1.text, "And which color is it?")
	got := run(t, next, second)
	want := run(t, startEngine(t, Options{Parallel: 1}), second)
	if got.usage.CachedTokens != 0 || got.text != want.text {
		t.Fatalf("after a full disk: cached %d, %q; encoded afresh %q", got.usage.CachedTokens, got.text, want.text)
	}
}

// slowDisk holds every write until release is closed.
type slowDisk struct {
	w       io.Writer
	release chan struct{}
}

func (s *slowDisk) Write(p []byte) (int, error) {
	<-s.release
	return s.w.Write(p)
}

// A conversation that left its slot for a disk that has not written it yet
// continues from the queued copy (reused_from "disk", every cell of its history),
// with the answer of encoding it again, and the loop never waits for the disk.
func TestDiskTierServesWhatIsStillBeingWritten(t *testing.T) {
	id := testModelID(t)
	e := startEngine(t, Options{Parallel: 1, Reuse: true, CacheDir: t.TempDir(), ModelID: id})
	release := make(chan struct{})
	e.disk.device = func(w io.Writer) io.Writer { return &slowDisk{w: w, release: release} }
	first := pictureTurn1("a", elasticcache.Spec{}, testPNG(t, 1))
	a1 := run(t, e, first)
	run(t, e, pictureTurn1("b", elasticcache.Spec{}, testPNG(t, 2))) // a leaves its slot; its write waits
	second := turn2(first, a1.text, "And which color is it?")
	a2 := run(t, e, second)
	if st := e.Stats(); st.DiskCache.Stored != 0 {
		t.Fatalf("the slow disk finished a write before it was released: %+v", st)
	}
	close(release)
	if a2.kv.ReusedFrom != "disk" || a2.usage.CachedTokens < a1.usage.PromptTokens-1 {
		t.Fatalf("second turn: cached %d from %q, the first turn's prompt is %d tokens", a2.usage.CachedTokens, a2.kv.ReusedFrom, a1.usage.PromptTokens)
	}
	if again := run(t, e, noReuse(second)); again.text != a2.text {
		t.Fatalf("continued from the queued copy %q, encoded again %q", a2.text, again.text)
	}
	stopClean(e)
	if st := e.Stats(); st.DiskCache.Failures != 0 || st.DiskCache.Stored == 0 {
		t.Fatalf("after the disk caught up: %+v", st)
	}
}
