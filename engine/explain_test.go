package engine

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// checkExplain asserts what every explanation must hold: one layer per planned
// layer; per layer the regions' plan counts add up to the prompt's entries and
// their decode evictions plus held entries to what entered the cache; one image per
// image chunk, its states and anchors one per entry per layer, consistent with
// the image region's counts; every merged entry names a kept anchor.
func checkExplain(t *testing.T, name string, r result, layers, images int, wantMerged bool) *completion.KVExplain {
	t.Helper()
	x := r.kv.Explain
	if x == nil {
		t.Fatalf("%s: no explain in %+v", name, r.kv)
	}
	if len(x.Layers) != layers || len(x.Images) != images {
		t.Fatalf("%s: %d layers, %d images; want %d and %d", name, len(x.Layers), len(x.Images), layers, images)
	}
	n := r.usage.PromptTokens
	merged := 0
	for l, xl := range x.Layers {
		entries, plan, after := 0, 0, 0
		for g, c := range xl.Regions {
			if completion.Region(g) == completion.RegionAnswer {
				if c.Entries != r.usage.CompletionTokens && c.Entries != r.usage.CompletionTokens-1 {
					t.Errorf("%s layer %d: %d answer entries for %d generated tokens", name, l, c.Entries, r.usage.CompletionTokens)
				}
				after += c.Entries
				continue
			}
			entries += c.Entries
			plan += c.Kept + c.Merged + c.Evicted
			after += c.Kept
			if c.Kept+c.Merged+c.Evicted != c.Entries {
				t.Errorf("%s layer %d %s: kept %d + merged %d + evicted %d != %d entries", name, l, completion.RegionNames[g], c.Kept, c.Merged, c.Evicted, c.Entries)
			}
			merged += c.Merged
		}
		held, dec := 0, 0
		for _, c := range xl.Regions {
			held += c.Held
			dec += c.DecodeEvicted
		}
		if entries != n || plan != n {
			t.Errorf("%s layer %d: regions hold %d entries, plan counts %d; the prompt has %d", name, l, entries, plan, n)
		}
		if held+dec != after || held != r.kv.FinalCells {
			t.Errorf("%s layer %d: held %d + decode evicted %d != %d entered; final cells %d", name, l, held, dec, after, r.kv.FinalCells)
		}
		if l == 0 && xl.Regions[completion.RegionImage].Entries == 0 && images > 0 {
			t.Errorf("%s: no image entries", name)
		}
	}
	imageEntries := 0
	for i, im := range x.Images {
		imageEntries += im.Entries
		if im.Rows*im.Cols != 0 && im.Rows*im.Cols != im.Entries {
			t.Errorf("%s image %d: grid %dx%d for %d entries", name, i, im.Rows, im.Cols, im.Entries)
		}
		if len(im.Tiles) == 0 {
			t.Fatalf("%s image %d: no tiles", name, i)
		}
		off := 0
		for k, tl := range im.Tiles {
			if tl.Offset != off || (k == 0 && tl.Start != im.Start) {
				t.Errorf("%s image %d tile %d: offset %d start %d, want offset %d", name, i, k, tl.Offset, tl.Start, off)
			}
			if tl.Rows*tl.Cols+tl.Queries != tl.Entries || (tl.Rows*tl.Cols != 0 && tl.Queries != 0) {
				t.Errorf("%s image %d tile %d: %dx%d grid, %d queries for %d entries", name, i, k, tl.Rows, tl.Cols, tl.Queries, tl.Entries)
			}
			off += tl.Entries
		}
		if off != im.Entries {
			t.Errorf("%s image %d: tiles hold %d entries, the image %d", name, i, off, im.Entries)
		}
		at := map[int]int{} // prompt index -> index in the image's rows
		for _, tl := range im.Tiles {
			for k := range tl.Entries {
				at[tl.Start+k] = tl.Offset + k
			}
		}
		if len(im.States) != layers || len(im.Anchors) != layers {
			t.Fatalf("%s image %d: %d state rows, %d anchor rows", name, i, len(im.States), len(im.Anchors))
		}
		for l, st := range im.States {
			if len(st) != im.Entries || len(im.Anchors[l]) != im.Entries {
				t.Fatalf("%s image %d layer %d: %d states, %d anchors for %d entries", name, i, l, len(st), len(im.Anchors[l]), im.Entries)
			}
			for j := range st {
				a := im.Anchors[l][j]
				if (st[j] == completion.StateMerged) != (a >= 0) {
					t.Errorf("%s image %d layer %d entry %d: state %c, anchor %d", name, i, l, j, st[j], a)
				}
				if k, ok := at[a]; a >= 0 && ok {
					if s := st[k]; s != completion.StateKept && s != completion.StateDecodeEvicted {
						t.Errorf("%s image %d layer %d: entry %d merged into %d, whose state is %c", name, i, l, j, a, s)
					}
				}
			}
			if len(x.Images) == 1 {
				c := x.Layers[l].Regions[completion.RegionImage]
				if got := strings.Count(st, "m"); got != c.Merged {
					t.Errorf("%s layer %d: %d merged image states, counts say %d", name, l, got, c.Merged)
				}
				if got := strings.Count(st, "e"); got != c.Evicted {
					t.Errorf("%s layer %d: %d evicted image states, counts say %d", name, l, got, c.Evicted)
				}
			}
		}
	}
	if images > 0 && imageEntries != x.Layers[0].Regions[completion.RegionImage].Entries {
		t.Errorf("%s: images hold %d entries, the image region %d", name, imageEntries, x.Layers[0].Regions[completion.RegionImage].Entries)
	}
	if wantMerged && merged == 0 {
		t.Errorf("%s: elastic merged nothing", name)
	}
	return x
}

// Every family explains what full, elastic, h2o and local did, and a request
// without explain carries none.
func TestExplainFamilies(t *testing.T) {
	for _, arch := range testFamilies {
		t.Run(arch, func(t *testing.T) {
			_, m, v := loadFamily(t, arch)
			te := startEngineOn(t, m, v, Options{Parallel: 1, CtxSize: 2048})
			img := testPNG(t, 1)
			plain := run(t, te, greedyReq("plain", longPrompt, 8, cfg(elasticcache.Elastic, 0.5), img))
			if plain.kv.Explain != nil {
				t.Fatal("explain without asking")
			}
			layers := len(te.cacheLayers)
			for _, c := range []struct {
				spec   elasticcache.Spec
				merged bool
			}{{cfg(elasticcache.Full, 1), false}, {cfg(elasticcache.Elastic, 0.5), true}, {cfg(elasticcache.H2O, 0.5), false},
				{cfg(elasticcache.Local, 0.3), false}, {refCfg(elasticcache.Elastic, 0.5), true}} {
				name := arch + "/" + string(c.spec.Policy())
				req := greedyReq(name, longPrompt, 12, c.spec, img)
				req.Explain = true
				r := run(t, te, req)
				checkExplain(t, name, r, layers, 1, c.merged)
				if c.spec.Policy() == elasticcache.Full && !strings.Contains(r.kv.Explain.Images[0].States[0], "k") {
					t.Errorf("%s: states %q", name, r.kv.Explain.Images[0].States[0])
				}
				if r.text != run(t, te, greedyReq(name, longPrompt, 12, c.spec, img)).text {
					t.Errorf("%s: explain changed the answer", name)
				}
			}
		})
	}
}

// On the bundled demo model (LLaVA-1.5 layout) the picture is a 12 x 12 grid, and
// the default setting merges some of its patches.
func TestExplainDemoGrid(t *testing.T) {
	dir := filepath.Join("..", "models", "demo")
	if _, err := os.Stat(filepath.Join(dir, "model.gguf")); err != nil {
		t.Skip("no demo model")
	}
	m, err := llama.LoadModel(filepath.Join(dir, "model.gguf"), llama.ModelParams{UseMmap: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	v, err := llama.LoadVision(m, filepath.Join(dir, "mmproj.gguf"), llama.VisionParams{Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	png, err := os.ReadFile(filepath.Join(dir, "example.png"))
	if err != nil {
		t.Fatal(err)
	}
	te := startEngineOn(t, m, v, Options{Parallel: 1, CtxSize: 1024})
	req := greedyReq("demo", "What color is the circle?", 8, cfg(elasticcache.Elastic, 0.3), png)
	req.Explain = true
	r := run(t, te, req)
	x := checkExplain(t, "demo", r, m.Info().Layers, 1, true)
	if im := x.Images[0]; im.Rows != 12 || im.Cols != 12 || im.Entries != 144 {
		t.Errorf("demo image: %dx%d grid, %d entries; want 12x12, 144", im.Rows, im.Cols, im.Entries)
	}
	if r.text != " red" {
		t.Errorf("demo answer %q", r.text)
	}
}

// wantTiles is each test family's tile layout of testPNG: tiles, entries per tile,
// the grid side (0: queries), and whether the first (or last) tile is an overview.
var wantTiles = map[string]struct {
	tiles, entries, side int
	overview             int // index of the overview tile, -1 for none
	places               [][2]int
}{
	"llava16":  {5, 36, 6, 0, [][2]int{{0, 0}, {1, 1}, {1, 2}, {2, 1}, {2, 2}}},
	"smolvlm":  {5, 16, 4, 4, [][2]int{{1, 1}, {1, 2}, {2, 1}, {2, 2}, {0, 0}}},
	"minicpmv": {5, 16, 0, 0, [][2]int{{0, 0}, {1, 1}, {1, 2}, {2, 1}, {2, 2}}},
	"gemma3":   {1, 16, 4, -1, [][2]int{{0, 0}}},
	"qwen25vl": {1, 36, 6, -1, [][2]int{{0, 0}}},
}

// Each picture is one image, its tiles laid out as the encoder cut it, and a
// prompt with two pictures explains each as a prompt with one does.
func TestExplainTiles(t *testing.T) {
	for _, arch := range testFamilies {
		t.Run(arch, func(t *testing.T) {
			want, ok := wantTiles[arch]
			if !ok {
				t.Fatalf("no tile layout for %s", arch)
			}
			_, m, v := loadFamily(t, arch)
			te := startEngineOn(t, m, v, Options{Parallel: 1, CtxSize: 2048})
			req := greedyReq(arch, "Compare the two pictures.", 4, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1), testPNG(t, 2))
			req.Explain = true
			r := run(t, te, req)
			x := checkExplain(t, arch, r, len(te.cacheLayers), 2, true)
			for i, im := range x.Images {
				if len(im.Tiles) != want.tiles || im.Entries != want.tiles*want.entries {
					t.Fatalf("image %d: %d tiles, %d entries; want %d of %d", i, len(im.Tiles), im.Entries, want.tiles, want.entries)
				}
				for k, tl := range im.Tiles {
					side := tl.Rows
					if tl.Rows != tl.Cols {
						t.Errorf("image %d tile %d: %dx%d", i, k, tl.Rows, tl.Cols)
					}
					if side != want.side || (side == 0 && tl.Queries != want.entries) {
						t.Errorf("image %d tile %d: %dx%d grid, %d queries; want side %d", i, k, tl.Rows, tl.Cols, tl.Queries, want.side)
					}
					if tl.Overview != (k == want.overview) || tl.Row != want.places[k][0] || tl.Col != want.places[k][1] {
						t.Errorf("image %d tile %d (%q): overview %v, place %d,%d; want %v, %v", i, k, tl.Label, tl.Overview, tl.Row, tl.Col, k == want.overview, want.places[k])
					}
				}
				if want.tiles == 1 && (im.Rows != want.side || im.Cols != want.side) {
					t.Errorf("image %d: %dx%d, want the tile's grid", i, im.Rows, im.Cols)
				}
			}
			if x.Images[1].Start <= x.Images[0].Start+x.Images[0].Entries-1 {
				t.Errorf("images overlap: %+v", x.Images)
			}
			// The spans cover the prompt once, in order.
			next := 0
			for _, sp := range x.Spans {
				if sp.Start != next || sp.Entries <= 0 || (sp.Region == completion.RegionImage) != (sp.Text == "") {
					t.Fatalf("span %+v after %d", sp, next)
				}
				next += sp.Entries
			}
			if next != r.usage.PromptTokens {
				t.Errorf("spans cover %d of %d entries", next, r.usage.PromptTokens)
			}
		})
	}
}

func TestSquareTilesAndGrid(t *testing.T) {
	for _, c := range []struct{ n, s, k int }{
		{144, 12, 1}, {576, 24, 1}, {180, 6, 5}, {2880, 24, 5}, {1728, 24, 3},
		{96, 0, 1},                // a resampler's queries (6 x 16) are not split
		{64, 8, 1}, {2304, 48, 1}, // square counts stay one tile (4 anyres tiles of 24 x 24 read as one 48 x 48 grid)
		{7, 0, 1},
	} {
		if s, k := squareTiles(c.n); s != c.s || k != c.k {
			t.Errorf("squareTiles(%d) = %d, %d; want %d, %d", c.n, s, k, c.s, c.k)
		}
	}
	for _, c := range []struct{ k, w, h, rows, cols int }{
		{4, 100, 100, 2, 2}, {2, 200, 100, 1, 2}, {2, 100, 200, 2, 1}, {3, 300, 100, 1, 3}, {4, 0, 0, 1, 4},
	} {
		if r, cl := tileGrid(c.k, c.w, c.h); r != c.rows || cl != c.cols {
			t.Errorf("tileGrid(%d, %d, %d) = %dx%d, want %dx%d", c.k, c.w, c.h, r, cl, c.rows, c.cols)
		}
	}
}
