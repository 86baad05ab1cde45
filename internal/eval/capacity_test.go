package eval

import (
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
)

func TestCapacityAppliesTheAdmissionRule(t *testing.T) {
	llava7b := Shape{Name: "7B", Layers: 32, KVWidth: 4096}
	c := elasticcache.DefaultConfig()
	c.Policy, c.Budget = elasticcache.Elastic, 0.5
	half := elasticcache.MustSpec(c)
	rows, err := Capacity(llava7b, 650, 256, 1<<30, []elasticcache.Spec{{}, half}, DefaultKVSettings[:2])
	if err != nil {
		t.Fatal(err)
	}
	// f16: 32 layers x (4096 + 4096) x 2 bytes = 512 KiB a cell; q8_0 keys: 4096/32
	// blocks of 34 bytes = 4352 bytes, plus 8192 for the f16 value row.
	f16Cell, q8Cell := int64(32*8192*2), int64(32*(4352+8192))
	tests := []struct {
		policy, kv    string
		cells, stream int
		per           int64
	}{
		{"full", "f16", 906, 1024, f16Cell},
		{"elastic 0.5", "f16", 454, 512, f16Cell}, // ceil(0.5 x 906) + 1, in a 512-cell stream
		{"full", DefaultKVSettings[1].Name, 906, 1024, q8Cell},
		{"elastic 0.5", DefaultKVSettings[1].Name, 454, 512, q8Cell},
	}
	if len(rows) != len(tests) {
		t.Fatalf("%d rows: %+v", len(rows), rows)
	}
	for _, tc := range tests {
		var got *CapacityRow
		for i := range rows {
			if rows[i].Policy == tc.policy && rows[i].KV == tc.kv {
				got = &rows[i]
			}
		}
		if got == nil {
			t.Fatalf("no row for %s / %s", tc.policy, tc.kv)
		}
		want := int((1 << 30) / (int64(tc.stream) * tc.per))
		if got.Cells != tc.cells || got.StreamCells != tc.stream || got.StreamBytes != int64(tc.stream)*tc.per || got.Conversations != want {
			t.Errorf("%s / %s: %+v, want %d cells in %d-cell streams, %d conversations", tc.policy, tc.kv, *got, tc.cells, tc.stream, want)
		}
	}
	md := CapacityMarkdown(rows, DefaultKVSettings[:2])
	if !strings.Contains(md, "| full | 906 | 1024 | 2 | 2 |") || !strings.Contains(md, "| elastic 0.5 | 454 | 512 | 4 | 5 |") {
		t.Errorf("table:\n%s", md)
	}
}

func TestCapacityRefusesRowsThatAreNotWholeBlocks(t *testing.T) {
	if _, err := Capacity(Shape{Name: "odd", Layers: 2, KVWidth: 48}, 10, 10, 1<<30, []elasticcache.Spec{{}}, DefaultKVSettings); err == nil {
		t.Fatal("a 48-element row was accepted for q8_0")
	}
}
