package config

import (
	"strings"
	"testing"
	"testing/fstest"
)

func TestHostMemoryFrom(t *testing.T) {
	meminfo := &fstest.MapFile{Data: []byte("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")}
	for _, c := range []struct {
		name   string
		fs     fstest.MapFS
		want   uint64
		source string
	}{
		{"meminfo alone", fstest.MapFS{"proc/meminfo": meminfo}, 20000000 << 10, "MemAvailable"},
		{"a v2 limit below what is available", fstest.MapFS{
			"proc/meminfo":                       meminfo,
			"proc/self/cgroup":                   {Data: []byte("0::/pod/c\n")},
			"sys/fs/cgroup/pod/c/memory.max":     {Data: []byte("4294967296\n")},
			"sys/fs/cgroup/pod/c/memory.current": {Data: []byte("1073741824\n")},
		}, 3 << 30, "memory.max"},
		{"v2 without a limit", fstest.MapFS{
			"proc/meminfo":                       meminfo,
			"proc/self/cgroup":                   {Data: []byte("0::/pod/c\n")},
			"sys/fs/cgroup/pod/c/memory.max":     {Data: []byte("max\n")},
			"sys/fs/cgroup/pod/c/memory.current": {Data: []byte("1073741824\n")},
		}, 20000000 << 10, "MemAvailable"},
		{"a v1 limit", fstest.MapFS{
			"proc/meminfo":     meminfo,
			"proc/self/cgroup": {Data: []byte("4:memory:/docker/x\n1:cpu:/\n")},
			"sys/fs/cgroup/memory/docker/x/memory.limit_in_bytes": {Data: []byte("2147483648\n")},
			"sys/fs/cgroup/memory/docker/x/memory.usage_in_bytes": {Data: []byte("536870912\n")},
		}, 1536 << 20, "memory.limit_in_bytes"},
		{"v1 unlimited", fstest.MapFS{
			"proc/meminfo":     meminfo,
			"proc/self/cgroup": {Data: []byte("4:memory:/\n")},
			"sys/fs/cgroup/memory/memory.limit_in_bytes": {Data: []byte("9223372036854771712\n")},
			"sys/fs/cgroup/memory/memory.usage_in_bytes": {Data: []byte("536870912\n")},
		}, 20000000 << 10, "MemAvailable"},
		{"nothing readable", fstest.MapFS{}, 0, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := HostMemoryFrom(c.fs)
			if got.Free != c.want || !strings.Contains(got.Source, c.source) {
				t.Fatalf("HostMemoryFrom = %+v, want %d from %q", got, c.want, c.source)
			}
		})
	}
}

func TestAutoSeqCells(t *testing.T) {
	const perCell = 48 << 10 // 125M-parameter llama: 12 layers x 2 x 1024 f16
	for _, c := range []struct {
		name               string
		ctxTrain, parallel int
		free               uint64
		want               int
		why                string
	}{
		{"memory to spare: the training context", 8192, 4, 16 << 30, 8192, "training context"},
		{"memory bounds it", 8192, 4, 1 << 30, 2048, "50% of 1024 MiB"},
		{"rounded down to 256", 8192, 4, 900 << 20, 1792, "50%"},
		{"never below 256", 131072, 4, 1 << 20, 256, "50%"},
		{"memory unknown: the training context", 4096, 2, 0, 4096, "unknown"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why := AutoSeqCells(c.ctxTrain, c.parallel, perCell, Memory{Free: c.free, Source: "test"})
			if got != c.want || !strings.Contains(why, c.why) {
				t.Fatalf("AutoSeqCells = %d (%s), want %d (%q)", got, why, c.want, c.why)
			}
		})
	}
}

func TestAutoPrefillStreams(t *testing.T) {
	const perCell = 48 << 10 // 125M-parameter llama: 12 layers x 2 x 1024 f16
	for _, c := range []struct {
		name                      string
		parallel, decode, prefill int
		free                      uint64
		want                      int
		why                       string
	}{
		// 16 GiB: 8 GiB of KV = 174,762 cells; 4 x 8192 decode leaves 142k
		{"memory to spare: one per slot", 4, 4 * 8192, 8192, 16 << 30, 4, "17 prefill streams"},
		{"at most 4", 8, 8 * 2048, 2048, 16 << 30, MaxAutoPrefillStreams, "at most 4"},
		{"at most one per slot", 2, 2 * 8192, 8192, 16 << 30, 2, "at most 2"},
		// 2 GiB: 21,845 cells; 4 x 2048 decode leaves 13,653: 2 streams of 5,120
		{"what memory holds", 4, 4 * 2048, 5120, 2 << 30, 2, "2 prefill streams"},
		// 900 MiB: 9,600 cells, 1,408 beside the decode context: not a stream
		{"nothing left: one", 4, 4 * 2048, 2048, 900 << 20, 1, "0 prefill streams"},
		{"memory unknown: one", 4, 4 * 2048, 2048, 0, 1, "unknown"},
		{"one slot", 1, 8192, 8192, 16 << 30, 1, "one slot"},
		{"no prefill context", 4, 4 * 2048, 0, 16 << 30, 1, "no prefill context"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why := AutoPrefillStreams(c.parallel, c.decode, c.prefill, perCell, Memory{Free: c.free, Source: "test"})
			if got != c.want || !strings.Contains(why, c.why) {
				t.Fatalf("AutoPrefillStreams = %d (%s), want %d (%q)", got, why, c.want, c.why)
			}
		})
	}
}
