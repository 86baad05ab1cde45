package engine

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	_ "image/gif" // picture sizes for the tile layout
	_ "image/jpeg"
	_ "image/png"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// This file is the one account of what a cache policy did to a request's entries:
// the server's kv_cache.explain (Request.Explain) and elastic-eval explain both
// label the prompt with Regions, record a Trace from the engine's observations and
// turn it into counts and entry states with Replay.

// PromptRegions labels every position of a prompt as the engine encodes it.
type PromptRegions struct {
	Of []completion.Region // region of each prompt position; len is N
	// Pos is the position the engine gives each prompt entry: its index, but for
	// an M-RoPE image, whose entries all take the image's first position and which
	// advances the position by max(rows, cols) only (NPos).
	Pos     []int
	NPos    int // the position after the prompt
	Size    [completion.NumRegions]int
	Images  []PromptImage // the pictures, in prompt order
	Spans   []completion.ExplainSpan
	Notes   []string // text spans that could not be located (counted as template)
	ImageNs []int    // entries of each picture, in order
}

// PromptImage is one picture of a prompt: the image chunks (tiles) it became.
type PromptImage struct {
	Start, N int // prompt index of its first entry; entries over all tiles
	Tiles    []completion.ExplainTile
}

// N is the number of prompt positions.
func (p *PromptRegions) N() int { return len(p.Of) }

// Regions labels the prompt positions of msgs as the engine lays them out:
// positions of image chunks are "image"; the text of system messages is "system"
// and that of the other messages "question", found by tokenizing each text part
// and locating its tokens, in prompt order, inside the text chunks; everything else
// is "template". A part whose tokens cannot be found is left as template and named
// in Notes.
//
// The tokenizer may tokenize a text differently inside the rendered prompt than
// alone (a SentencePiece leading space, a BPE merge with the template's next
// character): the part is tried as is and with a leading space, then with its first
// and/or last token matched only by its text (the prompt's token there spells the
// same word, with or without a leading space, or begins with the last token's
// text), or without its first token when that token is only a space.
func Regions(m *llama.Model, v *llama.Vision, msgs []completion.Message) (*PromptRegions, error) {
	p, err := buildPrompt(m, v, msgs, "")
	if err != nil {
		return nil, err
	}
	if p.c != nil {
		defer p.c.Close()
	}
	return regionsOf(m, v, p.chunks, msgs)
}

// pictureChunks is how many image chunks each picture of images became, in
// order. One chunk per picture needs no work; otherwise (tiled pictures) each
// picture is preprocessed again on its own to count its chunks.
func pictureChunks(v *llama.Vision, chunks []promptChunk, images [][]byte) ([]int, error) {
	n := 0
	for _, c := range chunks {
		if c.kind == llama.ChunkImage {
			n++
		}
	}
	per := make([]int, len(images))
	switch {
	case len(images) == 0 && n == 0:
		return per, nil
	case n == len(images):
		for i := range per {
			per[i] = 1
		}
		return per, nil
	case len(images) == 1:
		per[0] = n
		return per, nil
	case v == nil || len(images) == 0:
		return nil, fmt.Errorf("%d image chunks for %d pictures", n, len(images))
	}
	sum := 0
	for i, img := range images {
		p, err := v.Tokenize(llama.MediaMarker(), [][]byte{img}, false)
		if err != nil {
			return nil, fmt.Errorf("picture %d: %w", i, err)
		}
		for _, c := range p.Chunks {
			if c.Kind == llama.ChunkImage {
				per[i]++
			}
		}
		p.Close()
		sum += per[i]
	}
	if sum != n {
		return nil, fmt.Errorf("the pictures alone make %d image chunks, the prompt has %d", sum, n)
	}
	return per, nil
}

func imagesOf(msgs []completion.Message) [][]byte {
	var out [][]byte
	for _, m := range msgs {
		for _, p := range m.Parts {
			if p.Kind == completion.PartImage {
				out = append(out, p.Image)
			}
		}
	}
	return out
}

func regionsOf(m *llama.Model, v *llama.Vision, chunks []promptChunk, msgs []completion.Message) (*PromptRegions, error) {
	images := imagesOf(msgs)
	per, err := pictureChunks(v, chunks, images)
	if err != nil {
		return nil, err
	}
	piece := func(t llama.Token) string { return string(m.TokenPiece(t, true)) }
	pr := &PromptRegions{}
	texts := pr.layChunks(chunks, per, piece)
	pr.sizeImages(images)
	if err := pr.labelMessages(m, msgs, texts, piece); err != nil {
		return nil, err
	}
	for _, g := range pr.Of {
		pr.Size[g]++
	}
	pr.cutSpans(chunks, piece)
	return pr, nil
}

// textChunk is a text chunk of the prompt: its first prompt index and its tokens.
type textChunk struct {
	start int
	toks  []llama.Token
}

// layChunks gives every prompt entry its position and a first region (image
// entries: image; text: template until labelMessages finds a message's text
// there), groups the image chunks into pictures (per: chunks per picture) and
// their tiles, each labelled by the text right before it; it returns the text
// chunks.
func (pr *PromptRegions) layChunks(chunks []promptChunk, per []int, piece func(llama.Token) string) []textChunk {
	var texts []textChunk
	n, pos := 0, 0
	pic, left := -1, 0 // the picture being filled, and its chunks still to come
	label := ""        // the text right before the next image chunk
	for _, c := range chunks {
		for i := range c.n {
			if c.kind == llama.ChunkImage && c.nPos != c.n {
				pr.Pos = append(pr.Pos, pos)
			} else {
				pr.Pos = append(pr.Pos, pos+i)
			}
		}
		pos += c.nPos
		if c.kind == llama.ChunkImage {
			if left == 0 {
				pic++
				left = per[pic]
				pr.Images = append(pr.Images, PromptImage{Start: n})
			}
			left--
			img := &pr.Images[len(pr.Images)-1]
			img.Tiles = append(img.Tiles, completion.ExplainTile{Start: n, Offset: img.N, Entries: c.n,
				Rows: c.src.NY, Cols: c.src.NX, Label: label})
			img.N += c.n
			for range c.n {
				pr.Of = append(pr.Of, completion.RegionImage)
			}
		} else {
			texts = append(texts, textChunk{start: n, toks: c.tokens})
			var b strings.Builder
			for _, t := range c.tokens {
				b.WriteString(piece(t))
			}
			label = b.String()
			for range c.n {
				pr.Of = append(pr.Of, completion.RegionTemplate)
			}
		}
		n += c.n
	}
	pr.NPos = pos
	return texts
}

// sizeImages lays out each picture's tiles by the picture's size (read from its
// header; unknown when it cannot be read) and records its entries.
func (pr *PromptRegions) sizeImages(images [][]byte) {
	for i := range pr.Images {
		img := &pr.Images[i]
		var w, h int
		if i < len(images) {
			if cfg, _, err := image.DecodeConfig(bytes.NewReader(images[i])); err == nil {
				w, h = cfg.Width, cfg.Height
			}
		}
		img.Tiles = layoutTiles(img.Tiles, w, h)
		pr.ImageNs = append(pr.ImageNs, img.N)
	}
}

// labelMessages finds each message's text among the text chunks' tokens, in
// order, and labels it system or question; a text not found stays template, with
// a note.
func (pr *PromptRegions) labelMessages(m *llama.Model, msgs []completion.Message, texts []textChunk, piece func(llama.Token) string) error {
	cursor := 0 // prompt position the next span starts at or after
	for _, msg := range msgs {
		region := completion.RegionQuestion
		if msg.Role == "system" {
			region = completion.RegionSystem
		}
		for _, part := range msg.Parts {
			if part.Kind != completion.PartText || strings.TrimSpace(part.Text) == "" {
				continue
			}
			start, end, ok, err := findText(m, part.Text, texts, cursor, piece)
			if err != nil {
				return err
			}
			if !ok {
				pr.Notes = append(pr.Notes, fmt.Sprintf("%s text %q not found among the prompt's tokens: counted as template", region, abbrev(part.Text, 40)))
				continue
			}
			for p := start; p < end; p++ {
				pr.Of[p] = region
			}
			cursor = end
		}
	}
	return nil
}

// findText locates text (as written, after a space, or trimmed) in the text
// chunks at or after prompt index cursor: its prompt indices [start, end).
func findText(m *llama.Model, text string, texts []textChunk, cursor int, piece func(llama.Token) string) (start, end int, ok bool, err error) {
	for _, t := range []string{text, " " + text, strings.TrimSpace(text)} {
		want, err := m.Tokenize(t, false, false)
		if err != nil {
			return 0, 0, false, fmt.Errorf("tokenize: %w", err)
		}
		if len(want) == 0 {
			continue
		}
		for _, tc := range texts {
			if tc.start+len(tc.toks) <= cursor {
				continue
			}
			from := max(0, cursor-tc.start)
			if s, e, found := locate(tc.toks, from, want, piece); found {
				return tc.start + s, tc.start + e, true, nil
			}
		}
	}
	return -1, -1, false, nil
}

// cutSpans cuts the prompt into runs of one region inside one chunk.
func (pr *PromptRegions) cutSpans(chunks []promptChunk, piece func(llama.Token) string) {
	n := 0
	for _, c := range chunks {
		if c.kind == llama.ChunkImage {
			pr.Spans = append(pr.Spans, completion.ExplainSpan{Region: completion.RegionImage, Start: n, Entries: c.n})
			n += c.n
			continue
		}
		for i := 0; i < c.n; {
			j := i + 1
			for j < c.n && pr.Of[n+j] == pr.Of[n+i] {
				j++
			}
			var b strings.Builder
			for _, t := range c.tokens[i:j] {
				b.WriteString(piece(t))
			}
			pr.Spans = append(pr.Spans, completion.ExplainSpan{Region: pr.Of[n+i], Start: n + i, Entries: j - i, Text: b.String()})
			i = j
		}
		n += c.n
	}
}

var (
	rowColLabel = regexp.MustCompile(`<row_(\d+)_col_(\d+)>\s*$`)
	overviewTag = regexp.MustCompile(`(<global-img>|<image>)\s*$`)
	sliceTag    = regexp.MustCompile(`<slice>\s*$`)
	lastTag     = regexp.MustCompile(`<[^<>\s]+>\s*$`)
)

// anyresMinSide is the smallest tile side (in entries) that a chunk of several
// square tiles is split into; smaller square factors are more likely a
// resampler's query count (MiniCPM-V 2.5: 96 = 6 x 16) than tiles.
const anyresMinSide = 6

// layoutTiles gives each tile of a picture (w x h pixels, 0 when unknown) its
// grid and its place: M-RoPE tiles keep their grid; a tile of a square number of
// entries is square; a tile after a resampler's slice tag (MiniCPM-V's <image> /
// <slice>) is queries. A picture of one chunk of t x s*s entries (t > 1, s >=
// anyresMinSide, the count itself not a square) is LLaVA-1.6's anyres: t tiles of
// s x s, the first the overview, the others a row-major grid of t-1 tiles whose
// shape is the one closest to the picture's aspect. Tiles labelled
// <row_R_col_C> (SmolVLM) take that place; <global-img> and <image> mark the
// overview; MiniCPM-V's slices follow their rows (a newline starts a row).
func layoutTiles(tiles []completion.ExplainTile, w, h int) []completion.ExplainTile {
	if len(tiles) == 1 && tiles[0].Rows <= 1 {
		t := tiles[0]
		if s, k := squareTiles(t.Entries); k > 1 {
			gr, gc := tileGrid(k-1, w, h)
			out := make([]completion.ExplainTile, 0, k)
			for i := range k {
				tt := completion.ExplainTile{Start: t.Start + i*s*s, Offset: i * s * s, Entries: s * s, Rows: s, Cols: s}
				if i == 0 {
					tt.Overview = true
				} else {
					tt.Row, tt.Col, tt.TileRows, tt.TileCols = (i-1)/gc+1, (i-1)%gc+1, gr, gc
				}
				out = append(out, tt)
			}
			return out
		}
	}
	maxR, maxC := 0, 0
	row, col := 1, 0
	for i := range tiles {
		t := &tiles[i]
		label := t.Label
		t.Label = strings.TrimSpace(lastTag.FindString(label))
		switch {
		case t.Rows > 1 && t.Rows*t.Cols == t.Entries: // an M-RoPE grid
		case sliceTag.MatchString(label) || strings.HasSuffix(strings.TrimSpace(label), "<image>"):
			t.Rows, t.Cols, t.Queries = 0, 0, t.Entries
		default:
			t.Rows, t.Cols = 0, 0
			if r := int(math.Sqrt(float64(t.Entries))); r > 1 && r*r == t.Entries {
				t.Rows, t.Cols = r, r
			} else {
				t.Queries = t.Entries
			}
		}
		if mm := rowColLabel.FindStringSubmatch(label); mm != nil {
			t.Row, _ = strconv.Atoi(mm[1])
			t.Col, _ = strconv.Atoi(mm[2])
		} else if sliceTag.MatchString(label) {
			if col > 0 && strings.Contains(label, "\n") {
				row, col = row+1, 0
			}
			col++
			t.Row, t.Col = row, col
		} else if overviewTag.MatchString(label) && len(tiles) > 1 {
			t.Overview = true
		}
		maxR, maxC = max(maxR, t.Row), max(maxC, t.Col)
	}
	for i := range tiles {
		if tiles[i].Row > 0 {
			tiles[i].TileRows, tiles[i].TileCols = maxR, maxC
		}
	}
	return tiles
}

// squareTiles splits n entries into k tiles of s x s (see layoutTiles); k is 1
// when n is not such a split.
func squareTiles(n int) (s, k int) {
	if r := int(math.Sqrt(float64(n))); r*r == n {
		return r, 1
	}
	for s := int(math.Sqrt(float64(n / 2))); s >= anyresMinSide; s-- {
		if n%(s*s) == 0 {
			return s, n / (s * s)
		}
	}
	return 0, 1
}

// tileGrid is the rows x cols layout of k tiles closest to a w x h picture's
// aspect (one row when the picture's size is not known).
func tileGrid(k, w, h int) (rows, cols int) {
	rows, cols = 1, k
	if w <= 0 || h <= 0 {
		return rows, cols
	}
	best := math.Inf(1)
	for r := 1; r <= k; r++ {
		if k%r != 0 {
			continue
		}
		c := k / r
		if d := math.Abs(math.Log(float64(c)/float64(r)) - math.Log(float64(w)/float64(h))); d < best {
			best, rows, cols = d, r, c
		}
	}
	return rows, cols
}

// locate finds want in toks at or after from and returns the span [s, e) it
// covers. An exact match is preferred; failing that, want's first and/or last
// token may be matched by text only (see Regions).
func locate(toks []llama.Token, from int, want []llama.Token, piece func(llama.Token) string) (int, int, bool) {
	if s, e, ok := locate1(toks, from, want, piece); ok {
		return s, e, true
	}
	// A leading token that is only the tokenizer's space prefix (a tokenizer that
	// spells the space apart) has no counterpart after a newline.
	if len(want) > 1 && strings.TrimSpace(piece(want[0])) == "" {
		return locate1(toks, from, want[1:], piece)
	}
	return 0, 0, false
}

func locate1(toks []llama.Token, from int, want []llama.Token, piece func(llama.Token) string) (int, int, bool) {
	if i := tokenIndex(toks, from, want); i >= 0 {
		return i, i + len(want), true
	}
	sameWord := func(a, b llama.Token) bool {
		pa, pb := strings.TrimLeft(piece(a), " "), strings.TrimLeft(piece(b), " ")
		return pa != "" && pa == pb
	}
	startsWith := func(a, b llama.Token) bool { // a's text begins with b's
		pa, pb := piece(a), piece(b)
		return pb != "" && strings.HasPrefix(pa, pb)
	}
	for _, trim := range [][2]int{{1, 0}, {0, 1}, {1, 1}} {
		head, tail := trim[0], trim[1]
		core := want[head : len(want)-tail]
		if len(core) == 0 {
			continue
		}
		for i := from + head; i <= len(toks)-len(core); {
			j := tokenIndex(toks, i, core)
			if j < 0 {
				break
			}
			s, e := j-head, j+len(core)+tail
			okHead := head == 0 || (s >= from && sameWord(toks[s], want[0]))
			okTail := tail == 0 || (e <= len(toks) && startsWith(toks[e-1], want[len(want)-1]))
			if okHead && okTail {
				return s, e, true
			}
			i = j + 1
		}
	}
	return 0, 0, false
}

// tokenIndex is the first i >= from where toks[i:] starts with want, or -1.
func tokenIndex(toks []llama.Token, from int, want []llama.Token) int {
	for i := from; i+len(want) <= len(toks); i++ {
		if slices.Equal(toks[i:i+len(want)], want) {
			return i
		}
	}
	return -1
}

func abbrev(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n]) + "..."
}

// Trace is what the engine reported about one request's cache: the prompt plan
// and every decode step. Feed it the request's observations (Observe) in order.
type Trace struct {
	Prefill bool
	N       int // T at the prefill observation: the prompt's length
	Plan    *elasticcache.PrefillPlan
	Steps   []TraceStep
}

// TraceStep is one decode step: tokens processed, the position evicted (-1: none)
// and the entries held after it.
type TraceStep struct{ T, Evicted, Held int }

// Observe records o (an observation of the traced request).
func (t *Trace) Observe(o Observation) {
	if o.Prefill {
		t.Prefill, t.N, t.Plan = true, o.T, o.Plan
		return
	}
	t.Steps = append(t.Steps, TraceStep{T: o.T, Evicted: o.Evicted, Held: o.Held})
}

// Replayed is a trace replayed over a labelled prompt.
type Replayed struct {
	N, K      int // prompt entries, entries per layer after the prompt plan
	Generated int // tokens that entered the cache during generation
	Layers    []completion.LayerRegions
	// States[l][p] is prompt entry p's state in layer l (completion.State*), and
	// Anchors[l][p] the prompt index of the kept entry it was merged into (-1: none).
	States  [][]byte
	Anchors [][]int
}

// Replay turns a request's trace into per-layer region counts and entry states:
// the prompt plan first, then the decode steps, each appending the generated
// positions up to T to every layer and evicting, in every layer, the entry at the
// index the evicted position has among the engine's positions (the engine evicts
// the same index in every layer; its positions are layer 0's kept prompt
// positions, or 0..K-1 when compact, then the generated tokens'). nl is the number
// of planned layers.
//
// An M-RoPE image's entries share one position, so a decode eviction inside an
// image is attributed to the first held entry at that position: the counts are
// exact, the entry may be its neighbour.
func Replay(pr *PromptRegions, tr *Trace, nl int, compact bool) (*Replayed, error) {
	n := pr.N()
	rp := &Replayed{N: n, K: n, Layers: make([]completion.LayerRegions, nl), States: make([][]byte, nl), Anchors: make([][]int, nl)}
	if tr == nil || !tr.Prefill {
		return rp, errors.New("the engine reported no prefill")
	}
	if tr.N != n {
		return rp, fmt.Errorf("the engine encoded %d prompt tokens, the regions cover %d", tr.N, n)
	}
	held := make([][]int, nl) // prompt positions (n+g: generated token g) held per layer, in order
	for l := range nl {
		var err error
		if held[l], err = rp.replayPlan(pr, tr.Plan, l); err != nil {
			return rp, err
		}
	}
	if err := rp.replaySteps(pr, tr, held, compact); err != nil {
		return rp, err
	}
	for l := range nl {
		rp.Layers[l][completion.RegionAnswer].Entries = rp.Generated
		for _, p := range held[l] {
			rp.Layers[l][rp.region(pr, p)].Held++
		}
	}
	return rp, nil
}

// replayPlan applies the prompt plan (nil: everything kept) to layer l's counts,
// states and anchors, and returns the prompt positions the layer holds after it.
func (rp *Replayed) replayPlan(pr *PromptRegions, plan *elasticcache.PrefillPlan, l int) ([]int, error) {
	n, nl := rp.N, len(rp.Layers)
	lr := &rp.Layers[l]
	for g := range completion.NumRegions {
		lr[g].Entries = pr.Size[g]
	}
	state := make([]byte, n)
	anchor := make([]int, n)
	for p := range anchor {
		anchor[p] = -1
	}
	rp.States[l], rp.Anchors[l] = state, anchor
	if plan == nil {
		held := make([]int, n)
		for p := range n {
			held[p] = p
			state[p] = completion.StateKept
			lr[pr.Of[p]].Kept++
		}
		return held, nil
	}
	if len(plan.Layers) != nl || plan.N != n {
		return nil, fmt.Errorf("the plan covers %d layers and %d entries, want %d and %d", len(plan.Layers), plan.N, nl, n)
	}
	lp := plan.Layers[l]
	rp.K = plan.K
	for p := range state {
		state[p] = completion.StateEvicted
	}
	for i, g := range lp.Groups {
		for _, p := range g {
			if state[p] == completion.StateEvicted {
				state[p], anchor[p] = completion.StateMerged, lp.Keep[i]
			}
		}
	}
	for _, p := range lp.Keep {
		state[p], anchor[p] = completion.StateKept, -1
	}
	for p, st := range state {
		c := &lr[pr.Of[p]]
		switch st {
		case completion.StateKept:
			c.Kept++
		case completion.StateMerged:
			c.Merged++
		default:
			c.Evicted++
		}
	}
	return slices.Clone(lp.Keep), nil
}

// replaySteps replays the decode steps over held (per layer, the prompt positions
// held after the plan; n+g: generated token g): each step appends the generated
// positions up to its T and evicts the entry at the index its evicted position has
// among the engine's positions.
func (rp *Replayed) replaySteps(pr *PromptRegions, tr *Trace, held [][]int, compact bool) error {
	n := rp.N
	// pos: the engine's position of each held entry (the same in every layer);
	// shift: T minus the position of the next token.
	pos := make([]int, len(held[0]))
	for i, p := range held[0] {
		pos[i] = pr.Pos[p]
	}
	shift := n - pr.NPos
	if compact && tr.Plan != nil {
		shift = n - tr.Plan.K
		for i := range pos {
			pos[i] = i
		}
	}
	next := n
	for _, st := range tr.Steps {
		for ; next < st.T; next++ {
			for l := range held {
				held[l] = append(held[l], next)
			}
			pos = append(pos, next-shift)
			rp.Generated++
		}
		if st.Evicted >= 0 {
			idx := slices.Index(pos, st.Evicted)
			if idx < 0 {
				return fmt.Errorf("decode step at T=%d evicted position %d, which the sequence does not hold", st.T, st.Evicted)
			}
			pos = slices.Delete(pos, idx, idx+1)
			for l := range held {
				p := held[l][idx]
				rp.Layers[l][rp.region(pr, p)].DecodeEvicted++
				if p < n {
					rp.States[l][p] = completion.StateDecodeEvicted
				}
				held[l] = slices.Delete(held[l], idx, idx+1)
			}
		}
		if len(pos) != st.Held {
			return fmt.Errorf("decode step at T=%d: the engine holds %d entries, the replay %d", st.T, st.Held, len(pos))
		}
	}
	return nil
}

// region is the region of held position p (a generated token's past the prompt).
func (rp *Replayed) region(pr *PromptRegions, p int) completion.Region {
	if p >= rp.N {
		return completion.RegionAnswer
	}
	return pr.Of[p]
}

// Explain is what the server reports for an explained request: per planned layer
// (layers names their model layer indices) the counts, per picture its tiles and
// entries' states, and the prompt's spans.
func (rp *Replayed) Explain(pr *PromptRegions, layers []int) *completion.KVExplain {
	x := &completion.KVExplain{Layers: make([]completion.ExplainLayer, 0, len(rp.Layers)),
		Images: make([]completion.ExplainImage, 0, len(pr.Images)), Spans: pr.Spans}
	for l, lr := range rp.Layers {
		layer := l
		if l < len(layers) {
			layer = layers[l]
		}
		x.Layers = append(x.Layers, completion.ExplainLayer{Layer: layer, Regions: lr})
	}
	for _, img := range pr.Images {
		xi := completion.ExplainImage{Start: img.Start, Entries: img.N, Tiles: img.Tiles}
		if len(img.Tiles) == 1 {
			t := img.Tiles[0]
			xi.Rows, xi.Cols, xi.Queries = t.Rows, t.Cols, t.Queries
		}
		for l := range rp.States {
			st := make([]byte, 0, img.N)
			an := make([]int, 0, img.N)
			for _, t := range img.Tiles {
				st = append(st, rp.States[l][t.Start:t.Start+t.Entries]...)
				an = append(an, rp.Anchors[l][t.Start:t.Start+t.Entries]...)
			}
			xi.States = append(xi.States, string(st))
			xi.Anchors = append(xi.Anchors, an)
		}
		x.Images = append(x.Images, xi)
	}
	return x
}

// explainTraces holds the traces of the running requests that asked for an
// explanation, by the ID they are traced under. With none running, an
// observation costs one atomic load.
type explainTraces struct {
	n  atomic.Int64
	mu sync.Mutex
	m  map[string]*explainTrace
}

// explainTrace is one explained request's trace and its labelled prompt (nil
// with err when the prompt could not be labelled).
type explainTrace struct {
	Trace
	regions *PromptRegions
	err     error
}

// start begins tracing a request with id and returns the id it is traced under
// (id, or, when a running request is traced under id already, id with a suffix)
// and its trace.
func (x *explainTraces) start(id string) (string, *explainTrace) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.m == nil {
		x.m = map[string]*explainTrace{}
	}
	key := id
	for i := 2; x.m[key] != nil; i++ {
		key = fmt.Sprintf("%s#%d", id, i)
	}
	t := &explainTrace{}
	x.m[key] = t
	x.n.Add(1)
	return key, t
}

// take ends tracing id and returns its trace (nil when it is not traced). With
// want set, it ends the trace only when it is want (a later request may be traced
// under the same id).
func (x *explainTraces) take(id string, want *explainTrace) *explainTrace {
	x.mu.Lock()
	defer x.mu.Unlock()
	t, ok := x.m[id]
	if !ok || (want != nil && t != want) {
		return nil
	}
	delete(x.m, id)
	x.n.Add(-1)
	return t
}

func (x *explainTraces) observe(o Observation) {
	if x.n.Load() == 0 {
		return
	}
	x.mu.Lock()
	if t := x.m[o.RequestID]; t != nil {
		t.Observe(o)
	}
	x.mu.Unlock()
}

// observer is the engine's Observe: the explained requests' traces, then the
// caller's Options.Observe.
func (e *Engine) observer(user func(Observation)) func(Observation) {
	return func(o Observation) {
		e.traces.observe(o)
		if user != nil {
			user(o)
		}
	}
}

// startExplain labels the prompt of s, a prepared explained request, for its
// trace (on the caller's goroutine, so that the decode loop only replays).
func (e *Engine) startExplain(s *seq, t *explainTrace) {
	pr, err := regionsOf(e.model, e.vision, s.chunks, s.req.Messages)
	e.traces.mu.Lock()
	t.regions, t.err = pr, err
	e.traces.mu.Unlock()
}

// explain replays an explained request's trace at its end (on the decode loop);
// nil, with a warning logged, when the prompt could not be labelled or the replay
// disagrees with the engine.
func (e *Engine) explain(s *seq) *completion.KVExplain {
	tr := e.traces.take(s.req.ID, nil)
	if tr == nil || s.cache == nil {
		return nil
	}
	err := tr.err
	if err == nil {
		var rp *Replayed
		layers := s.cache.layers
		if rp, err = Replay(tr.regions, &tr.Trace, len(layers), s.req.Cache.CompactPositions()); err == nil {
			return rp.Explain(tr.regions, layers)
		}
	}
	e.log.Warn().Err(err).Str("request_id", s.req.ID).Msg("explain: could not account for the request's cache")
	return nil
}

// PlannedLayers are the model layers whose cache the policies plan: every layer,
// or a sliding-window model's full-attention layers (Replay's nl is their number).
func (e *Engine) PlannedLayers() []int { return slices.Clone(e.cacheLayers) }
