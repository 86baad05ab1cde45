package config

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
)

// Memory is how many bytes the process may still allocate, and where that number
// comes from.
type Memory struct {
	Free   uint64
	Source string
}

// DetectHostMemory reads the host memory the process may still use; see
// HostMemoryFrom.
func DetectHostMemory() Memory { return HostMemoryFrom(os.DirFS("/")) }

// HostMemoryFrom is the memory available to the process: the kernel's estimate of
// what can be allocated without swapping (MemAvailable in /proc/meminfo), or,
// when its cgroup (v2 memory.max, v1 memory.limit_in_bytes) allows less, the
// limit minus what the cgroup uses. Zero when nothing can be read.
func HostMemoryFrom(root fs.FS) Memory {
	var m Memory
	if f, err := root.Open("proc/meminfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) >= 2 && fields[0] == "MemAvailable:" {
				if kb, err := strconv.ParseUint(fields[1], 10, 64); err == nil {
					m = Memory{Free: kb << 10, Source: "MemAvailable"}
				}
			}
		}
		f.Close()
	}
	for _, c := range memoryLimits(root) {
		if m.Source == "" || c.Free < m.Free {
			m = c
		}
	}
	return m
}

// memoryLimits lists what the process's cgroups leave free: limit - usage.
func memoryLimits(root fs.FS) []Memory {
	f, err := root.Open("proc/self/cgroup")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []Memory
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		var limitFile, usageFile, dir string
		switch {
		case parts[0] == "0" && parts[1] == "":
			dir, limitFile, usageFile = "sys/fs/cgroup"+parts[2], "memory.max", "memory.current"
		case hasController(parts[1], "memory"):
			dir, limitFile, usageFile = "sys/fs/cgroup/memory"+parts[2], "memory.limit_in_bytes", "memory.usage_in_bytes"
		default:
			continue
		}
		dir = strings.TrimSuffix(dir, "/")
		limit, ok1 := readUint(root, dir+"/"+limitFile)
		usage, ok2 := readUint(root, dir+"/"+usageFile)
		// v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages).
		if !ok1 || !ok2 || limit >= 1<<60 {
			continue
		}
		free := uint64(0)
		if limit > usage {
			free = limit - usage
		}
		out = append(out, Memory{Free: free, Source: fmt.Sprintf("cgroup /%s/%s %d - %d used", dir, limitFile, limit, usage)})
	}
	return out
}

func readUint(root fs.FS, name string) (uint64, bool) {
	b, err := fs.ReadFile(root, name)
	if err != nil {
		return 0, false
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return v, err == nil
}

// KVShare is the share of free memory that automatic context sizing gives the
// KV caches; the rest stays for compute buffers, images and everything else.
const KVShare = 0.5

// AutoSeqCells is the cells each of parallel slots gets when --ctx-size is left
// automatic: the model's training context, unless KVShare of free memory cannot
// hold parallel such streams plus a prefill context of one stream's size (the
// prefill context of compressing policies is at most the training context); then
// what fits, rounded down to a multiple of 256, at least 256. why says which bound
// chose it.
func AutoSeqCells(ctxTrain, parallel int, bytesPerCell int64, free Memory) (cells int, why string) {
	if ctxTrain <= 0 {
		ctxTrain = 4096
	}
	parallel = max(parallel, 1)
	cells, why = ctxTrain, fmt.Sprintf("the model's training context (%d)", ctxTrain)
	if free.Free == 0 || bytesPerCell <= 0 {
		return cells, why + "; free memory unknown"
	}
	fit := int(float64(free.Free) * KVShare / float64(bytesPerCell) / float64(parallel+1))
	if fit < cells {
		cells = max(256, fit/256*256)
		why = fmt.Sprintf("%.0f%% of %d MiB free (%s) over %d slots and a prefill context at %d bytes per cell",
			KVShare*100, free.Free>>20, free.Source, parallel, bytesPerCell)
	}
	return cells, why
}

// MaxAutoPrefillStreams bounds the automatic --prefill-streams: each stream costs
// a whole prompt's cells (ceil(stream/budget)), while a burst's prompts gain from
// sharing calls mostly by going through the weights together, which a few already
// do.
const MaxAutoPrefillStreams = 4

// AutoPrefillStreams is how many prompts the prefill context holds side by side
// when --prefill-streams is left automatic: as many as parallel slots, up to
// MaxAutoPrefillStreams, whose prefillCells-cell streams fit in KVShare of free
// memory beside the decode context's decodeCells; at least 1 (today's memory:
// one prompt at a time), and 1 when free memory is unknown. Extra streams use
// only memory that automatic context sizing left over: they never shrink a slot.
func AutoPrefillStreams(parallel, decodeCells, prefillCells int, bytesPerCell int64, free Memory) (streams int, why string) {
	most := min(max(parallel, 1), MaxAutoPrefillStreams)
	if prefillCells <= 0 {
		return 1, "no prefill context"
	}
	if most == 1 {
		return 1, "one slot"
	}
	if free.Free == 0 || bytesPerCell <= 0 {
		return 1, "free memory unknown"
	}
	left := int64(float64(free.Free)*KVShare)/bytesPerCell - int64(decodeCells)
	fit := int(max(left, 0) / int64(prefillCells))
	streams = min(max(fit, 1), most)
	why = fmt.Sprintf("%.0f%% of %d MiB free (%s) holds %d decode cells and %d prefill streams of %d cells at %d bytes per cell (at most %d)",
		KVShare*100, free.Free>>20, free.Source, decodeCells, fit, prefillCells, bytesPerCell, most)
	return streams, why
}

// CacheRAMShare is the share of the memory the process may use (HostMemoryFrom)
// that the host tier takes when --cache-ram-mb is left at -1.
const CacheRAMShare = 0.10

// CacheRAMBytes is the host tier's bound: CacheRAMMB MiB, or, at -1, CacheRAMShare
// of m (0 when m is unknown: the tier is off).
func (c *Config) CacheRAMBytes(m Memory) int64 {
	if c.CacheRAMMB >= 0 {
		return int64(c.CacheRAMMB) << 20
	}
	return int64(float64(m.Free) * CacheRAMShare)
}
