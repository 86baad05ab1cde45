package config

import (
	"bufio"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path"
	"runtime"
	"strconv"
	"strings"
)

// CPUs is how many CPUs the process may keep busy, and where that number comes from.
type CPUs struct {
	N int
	// Source: "cgroup cpu.max 200000 100000" (v2), "cgroup cpu.cfs_quota_us 150000 /
	// 100000" (v1), or "affinity" (no quota: the CPUs the scheduler lets it use).
	Source string
}

// detectCPUs is DetectCPUs; tests may replace it.
var detectCPUs = DetectCPUs

// DetectCPUs reads the CPU quota of the process's cgroup from the running system;
// see CPUsFrom.
func DetectCPUs() CPUs {
	return CPUsFrom(os.DirFS("/"), runtime.NumCPU())
}

// CPUsFrom is the number of CPUs a process may keep busy: its cgroup's CPU quota
// rounded up (a pod limited to 1.5 CPUs runs 2 threads, each busy 75% of the
// time), never more than affinity (the CPUs in its affinity mask, runtime.NumCPU),
// and affinity alone when no quota is set or the files cannot be read. root is the
// file system the cgroup files are read from ("/" in production, a fake in tests):
// /proc/self/cgroup names the process's cgroup; cgroup v2 keeps the quota in
// cpu.max ("max 100000" or "200000 100000"), v1 in cpu.cfs_quota_us (-1: none) and
// cpu.cfs_period_us under the cpu controller's mount. A quota set on a parent
// cgroup also limits the process, so every level up to the root is read and the
// smallest quota wins.
//
// runtime.NumCPU ignores quotas, and Go's own quota-derived GOMAXPROCS may be
// overridden by the environment, so the engine asks here.
func CPUsFrom(root fs.FS, affinity int) CPUs {
	best := CPUs{N: max(affinity, 1), Source: "affinity"}
	named := false // a quota as small as affinity is named: it binds too
	for _, q := range cgroupQuotas(root) {
		if n := max(1, int(math.Ceil(q.cpus-1e-9))); n < best.N || n == best.N && !named {
			best, named = CPUs{N: n, Source: q.source}, true
		}
	}
	return best
}

type quota struct {
	cpus   float64
	source string
}

// cgroupQuotas lists the CPU quotas set on the process's cgroup and its parents.
func cgroupQuotas(root fs.FS) []quota {
	f, err := root.Open("proc/self/cgroup")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []quota
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controllers:path; v2 is "0::/path"
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		ctrls, p := parts[1], parts[2]
		switch {
		case parts[0] == "0" && ctrls == "":
			for dir := range ancestors(path.Join("sys/fs/cgroup", p), "sys/fs/cgroup") {
				if q, ok := readV2(root, dir); ok {
					out = append(out, q)
				}
			}
		case hasController(ctrls, "cpu"):
			for _, mount := range []string{"sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu"} {
				for dir := range ancestors(path.Join(mount, p), mount) {
					if q, ok := readV1(root, dir); ok {
						out = append(out, q)
					}
				}
			}
		}
	}
	return out
}

// ancestors yields dir and each parent up to and including stop.
func ancestors(dir, stop string) func(func(string) bool) {
	return func(yield func(string) bool) {
		for {
			if !yield(dir) || dir == stop || !strings.HasPrefix(dir, stop) {
				return
			}
			dir = path.Dir(dir)
		}
	}
}

func hasController(list, c string) bool {
	for _, x := range strings.Split(list, ",") {
		if x == c {
			return true
		}
	}
	return false
}

func readV2(root fs.FS, dir string) (quota, bool) {
	b, err := fs.ReadFile(root, path.Join(dir, "cpu.max"))
	if err != nil {
		return quota{}, false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || f[0] == "max" {
		return quota{}, false
	}
	q, err1 := strconv.ParseFloat(f[0], 64)
	p, err2 := strconv.ParseFloat(f[1], 64)
	if err1 != nil || err2 != nil || q <= 0 || p <= 0 {
		return quota{}, false
	}
	return quota{cpus: q / p, source: fmt.Sprintf("cgroup %s/cpu.max %s %s", "/"+dir, f[0], f[1])}, true
}

func readV1(root fs.FS, dir string) (quota, bool) {
	qb, err1 := fs.ReadFile(root, path.Join(dir, "cpu.cfs_quota_us"))
	pb, err2 := fs.ReadFile(root, path.Join(dir, "cpu.cfs_period_us"))
	if err1 != nil || err2 != nil {
		return quota{}, false
	}
	q, err1 := strconv.ParseFloat(strings.TrimSpace(string(qb)), 64)
	p, err2 := strconv.ParseFloat(strings.TrimSpace(string(pb)), 64)
	if err1 != nil || err2 != nil || q <= 0 || p <= 0 {
		return quota{}, false
	}
	return quota{cpus: q / p, source: fmt.Sprintf("cgroup %s/cpu.cfs_quota_us %.0f / %.0f", "/"+dir, q, p)}, true
}
