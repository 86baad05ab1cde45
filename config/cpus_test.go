package config

import (
	"strings"
	"testing"
	"testing/fstest"
)

func TestCPUsFromCgroupQuota(t *testing.T) {
	v2 := func(self, cpuMax string) fstest.MapFS {
		fs := fstest.MapFS{"proc/self/cgroup": {Data: []byte("0::" + self + "\n")}}
		if cpuMax != "" {
			fs["sys/fs/cgroup"+self+"/cpu.max"] = &fstest.MapFile{Data: []byte(cpuMax + "\n")}
		}
		return fs
	}
	for _, c := range []struct {
		name     string
		fs       fstest.MapFS
		affinity int
		want     int
		source   string // a substring of the source
	}{
		{"a pod limited to 2 CPUs on a 64-core node", v2("/kubepods/pod1/c1", "200000 100000"), 64, 2, "cpu.max 200000 100000"},
		{"a fractional quota rounds up", v2("/kubepods/pod1/c1", "150000 100000"), 64, 2, "cpu.max"},
		{"a quota under one CPU still runs one thread", v2("/x", "20000 100000"), 8, 1, "cpu.max"},
		{"no quota: affinity", v2("/x", "max 100000"), 6, 6, "affinity"},
		{"a quota above affinity: affinity", v2("/x", "1600000 100000"), 4, 4, "affinity"},
		{"no cgroup file system: affinity", fstest.MapFS{}, 3, 3, "affinity"},
		{"a garbled cpu.max: affinity", v2("/x", "lots 100000"), 5, 5, "affinity"},
		{"a parent's quota binds", fstest.MapFS{
			"proc/self/cgroup":                       {Data: []byte("0::/kubepods/pod1/c1\n")},
			"sys/fs/cgroup/kubepods/pod1/c1/cpu.max": {Data: []byte("max 100000\n")},
			"sys/fs/cgroup/kubepods/pod1/cpu.max":    {Data: []byte("300000 100000\n")},
		}, 16, 3, "/kubepods/pod1/cpu.max"},
		{"cgroup v1 cpu controller", fstest.MapFS{
			"proc/self/cgroup": {Data: []byte("12:memory:/docker/abc\n5:cpu,cpuacct:/docker/abc\n")},
			"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us":  {Data: []byte("250000\n")},
			"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": {Data: []byte("100000\n")},
		}, 32, 3, "cpu.cfs_quota_us 250000 / 100000"},
		{"cgroup v1 without a quota", fstest.MapFS{
			"proc/self/cgroup":                            {Data: []byte("5:cpu,cpuacct:/\n")},
			"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":  {Data: []byte("-1\n")},
			"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": {Data: []byte("100000\n")},
		}, 2, 2, "affinity"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := CPUsFrom(c.fs, c.affinity)
			if got.N != c.want || !strings.Contains(got.Source, c.source) {
				t.Fatalf("CPUsFrom = %+v, want %d from %q", got, c.want, c.source)
			}
		})
	}
}
