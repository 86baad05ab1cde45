package eval

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

// The regions cover the prompt exactly: the image region is the image chunk,
// and the question (and system) text is found in both layouts.
func TestRegionsFindQuestionInBothLayouts(t *testing.T) {
	r := openRunner(t, []float64{0.5})
	set, err := dataset.Load(synthData(t, 1, shapes.ColorOf), "")
	if err != nil || len(set.Samples) == 0 {
		t.Fatalf("%v %+v", err, set)
	}
	s := set.Samples[0]
	imgs, err := readImage(s.Image)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ layout, system string }{
		{LayoutImageFirst, ""}, {LayoutQuestionFirst, ""}, {LayoutQuestionFirst, LLaVASystem}, {LayoutImageFirst, "Be brief."},
	} {
		r.opts.Layout, r.opts.System = c.layout, c.system
		msgs, err := r.messages(s.Prompt, imgs)
		if err != nil {
			t.Fatal(err)
		}
		pr, err := engine.Regions(r.Model(), r.Vision(), msgs)
		if err != nil {
			t.Fatal(err)
		}
		name := c.layout + "/" + c.system
		if len(pr.Notes) > 0 {
			t.Errorf("%s: %v", name, pr.Notes)
		}
		chunks, err := engine.PromptChunks(r.Model(), r.Vision(), msgs)
		if err != nil {
			t.Fatal(err)
		}
		n, imageN := 0, 0
		for _, ch := range chunks {
			n += ch.N
			if ch.Image {
				imageN += ch.N
			}
		}
		sum := 0
		for _, v := range pr.Size {
			sum += v
		}
		if pr.N() != n || sum != n {
			t.Errorf("%s: regions cover %d positions (sizes add to %d), the prompt has %d", name, pr.N(), sum, n)
		}
		if pr.Size[completion.RegionImage] != imageN || imageN == 0 || len(pr.ImageNs) != 1 || pr.ImageNs[0] != imageN {
			t.Errorf("%s: image region %d, image chunks %d (%v)", name, pr.Size[completion.RegionImage], imageN, pr.ImageNs)
		}
		question := strings.TrimSpace(strings.ReplaceAll(s.Prompt, dataset.ImageToken, ""))
		qt, _ := r.Model().Tokenize(question, false, false)
		if got := pr.Size[completion.RegionQuestion]; got < len(qt)-1 || got > len(qt)+1 {
			t.Errorf("%s: question region %d positions, the question alone is %d tokens", name, got, len(qt))
		}
		if c.system != "" && pr.Size[completion.RegionSystem] == 0 {
			t.Errorf("%s: no system region", name)
		}
		if c.system == "" && pr.Size[completion.RegionSystem] != 0 {
			t.Errorf("%s: system region without a system prompt", name)
		}
		// Order: question before the image in question-first, after in image-first.
		firstQ, firstI := -1, -1
		for p, g := range pr.Of {
			if g == completion.RegionQuestion && firstQ < 0 {
				firstQ = p
			}
			if g == completion.RegionImage && firstI < 0 {
				firstI = p
			}
		}
		if (c.layout == LayoutQuestionFirst) != (firstQ < firstI) {
			t.Errorf("%s: question starts at %d, image at %d", name, firstQ, firstI)
		}
		t.Logf("%s: N %d, sizes %v", name, n, pr.Size)
	}
}

// Explain's counts add up: per sample the regions cover N; per layer and
// region kept + merged + evicted is the region's size; per layer the kept
// entries are K; elastic (paper selection) merges and never evicts at phase 1;
// what was held at the end plus what generation evicted is what was kept plus
// what was generated.
func TestExplainCountsAddUp(t *testing.T) {
	r := openRunner(t, []float64{0.5})
	r.opts.Policies = []elasticcache.Policy{elasticcache.Elastic, elasticcache.H2O}
	r.opts.Sink, r.opts.MaxTokens = 1, 24
	set, err := dataset.Load(synthData(t, 1, shapes.Describe, shapes.ColorOf), "")
	if err != nil || len(set.Samples) != 2 {
		t.Fatalf("%v %+v", err, set)
	}
	for _, layout := range []string{LayoutImageFirst, LayoutQuestionFirst} {
		r.opts.Layout = layout
		x, err := r.Explain(context.Background(), set.Samples)
		if err != nil {
			t.Fatal(err)
		}
		if len(x.Configs) != 2 || len(x.Skipped) != 0 || len(x.Notes) != 0 {
			t.Fatalf("%s: %d configs, skipped %v, notes %v", layout, len(x.Configs), x.Skipped, x.Notes)
		}
		for _, ce := range x.Configs {
			name := layout + "/" + configName(ce.Config)
			if len(ce.Samples) != 2 {
				t.Fatalf("%s: %d samples", name, len(ce.Samples))
			}
			var wantTotal completion.LayerRegions
			for _, se := range ce.Samples {
				sum := 0
				for _, v := range se.Regions.Size {
					sum += v
				}
				if sum != se.N || se.Regions.Size[completion.RegionAnswer] != 0 || se.K >= se.N {
					t.Errorf("%s %s: region sizes %v add to %d, N %d, K %d", name, se.Sample.ID, se.Regions.Size, sum, se.N, se.K)
				}
				if se.Generated == 0 {
					t.Errorf("%s %s: nothing generated", name, se.Sample.ID)
				}
				for l, lr := range se.Layers {
					kept, held, decodeEv := 0, 0, 0
					for g := range completion.NumRegions {
						c := lr[g]
						if g != completion.RegionAnswer && c.Kept+c.Merged+c.Evicted != c.Entries {
							t.Errorf("%s %s layer %d %s: %d kept + %d merged + %d evicted != %d", name, se.Sample.ID, l, g, c.Kept, c.Merged, c.Evicted, c.Entries)
						}
						if g != completion.RegionAnswer && c.Entries != se.Regions.Size[g] {
							t.Errorf("%s layer %d %s: %d entries, region size %d", name, l, g, c.Entries, se.Regions.Size[g])
						}
						if ce.Config.Policy() == elasticcache.Elastic && c.Evicted != 0 {
							t.Errorf("%s layer %d %s: elastic evicted %d prompt entries at phase 1", name, l, g, c.Evicted)
						}
						if ce.Config.Policy() == elasticcache.H2O && c.Merged != 0 {
							t.Errorf("%s layer %d %s: h2o merged %d", name, l, g, c.Merged)
						}
						kept += c.Kept
						held += c.Held
						decodeEv += c.DecodeEvicted
					}
					if kept != se.K {
						t.Errorf("%s %s layer %d: %d kept, K %d", name, se.Sample.ID, l, kept, se.K)
					}
					if held+decodeEv != se.K+se.Generated {
						t.Errorf("%s %s layer %d: held %d + decode evicted %d != K %d + generated %d", name, se.Sample.ID, l, held, decodeEv, se.K, se.Generated)
					}
					if lr[completion.RegionAnswer].Entries != se.Generated {
						t.Errorf("%s layer %d: answer entries %d, generated %d", name, l, lr[completion.RegionAnswer].Entries, se.Generated)
					}
					for g := range completion.NumRegions {
						wantTotal[g].Add(lr[g])
					}
				}
				if se.Regions.Size[completion.RegionImage] != se.Regions.ImageNs[0] {
					t.Errorf("%s: image region %d, image chunk %d", name, se.Regions.Size[completion.RegionImage], se.Regions.ImageNs[0])
				}
			}
			if wantTotal != ce.Total {
				t.Errorf("%s: total %+v, sum of the samples' layers %+v", name, ce.Total, wantTotal)
			}
			dec := 0
			for g := range completion.NumRegions {
				dec += ce.Total[g].DecodeEvicted
			}
			if dec == 0 {
				t.Errorf("%s: no decode eviction in 24 tokens at budget 0.5", name)
			}
			t.Logf("%s: total %+v", name, ce.Total)
		}
	}
	// The markdown and CSV name the configurations, layers and regions.
	md := func() string {
		x, err := r.Explain(context.Background(), set.Samples[:1])
		if err != nil {
			t.Fatal(err)
		}
		return x.Markdown("t", nil) + x.CSV()
	}()
	for _, want := range []string{"| all | image |", "| 0 | question |", "elastic,0.5,1,all,image,", "h2o@0.5"} {
		if !strings.Contains(md, want) {
			t.Errorf("output lacks %q:\n%s", want, md)
		}
	}
}

// The reference selection's compacted positions are mapped back to prompt
// positions: the replay agrees with the engine's held counts (it fails
// otherwise) and the counts add up the same way.
func TestExplainReferenceSelection(t *testing.T) {
	r := openRunner(t, []float64{0.5})
	r.opts.Policies = []elasticcache.Policy{elasticcache.Elastic}
	r.opts.Selection = elasticcache.ReferenceSelection
	r.opts.Sink, r.opts.MaxTokens = 1, 24
	set, err := dataset.Load(synthData(t, 1, shapes.Describe), "")
	if err != nil {
		t.Fatal(err)
	}
	if !r.Configs()[1].CompactPositions() {
		t.Skip("the reference selection does not compact positions here")
	}
	x, err := r.Explain(context.Background(), set.Samples)
	if err != nil {
		t.Fatal(err)
	}
	for _, se := range x.Configs[0].Samples {
		for l, lr := range se.Layers {
			held, ev := 0, 0
			for g := range completion.NumRegions {
				held += lr[g].Held
				ev += lr[g].DecodeEvicted
			}
			if held+ev != se.K+se.Generated {
				t.Errorf("layer %d: held %d + decode evicted %d != K %d + generated %d", l, held, ev, se.K, se.Generated)
			}
		}
	}
	t.Logf("total %+v", x.Configs[0].Total)
}

// RunExplain writes explain.md and explain.csv.
func TestRunExplainWritesFiles(t *testing.T) {
	r := openRunner(t, []float64{0.5})
	r.opts.Policies = []elasticcache.Policy{elasticcache.Elastic}
	out := t.TempDir()
	res, err := r.RunExplain(context.Background(), RunOptions{Data: synthData(t, 1, shapes.ColorOf), MaxSamples: 1, Out: out})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Files) != 2 {
		t.Fatalf("files %v", res.Files)
	}
	b, err := os.ReadFile(filepath.Join(out, "explain.csv"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if want := 1 + (1+r.Model().Info().Layers)*int(completion.NumRegions); len(lines) != want {
		t.Errorf("explain.csv has %d lines, want %d", len(lines), want)
	}
	if md, _ := os.ReadFile(filepath.Join(out, "explain.md")); !strings.Contains(string(md), "## elastic@0.5") {
		t.Errorf("explain.md:\n%s", md)
	}
}
