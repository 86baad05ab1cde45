package api

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// explainEvents is okEvents with a small explanation: one layer, one picture of
// one 2 x 2 tile between two text spans.
func explainEvents() []completion.Event {
	evs := okEvents("A", " red")
	var regions completion.LayerRegions
	regions[completion.RegionImage] = completion.RegionCounts{Entries: 4, Kept: 2, Merged: 1, Evicted: 1, Held: 2}
	regions[completion.RegionTemplate] = completion.RegionCounts{Entries: 7, Kept: 7, Held: 7}
	regions[completion.RegionAnswer] = completion.RegionCounts{Entries: 1, Held: 1}
	evs[len(evs)-1].KV.Explain = &completion.KVExplain{
		Layers: []completion.ExplainLayer{{Layer: 0, Regions: regions}},
		Images: []completion.ExplainImage{{Start: 3, Entries: 4, Rows: 2, Cols: 2,
			Tiles:  []completion.ExplainTile{{Start: 3, Entries: 4, Rows: 2, Cols: 2}},
			States: []string{"kmke"}, Anchors: [][]int{{-1, 3, -1, -1}}}},
		Spans: []completion.ExplainSpan{{Region: completion.RegionTemplate, Start: 0, Entries: 3, Text: "<s>U:"},
			{Region: completion.RegionImage, Start: 3, Entries: 4}, {Region: completion.RegionTemplate, Start: 7, Entries: 4, Text: "\nA:"}},
	}
	return evs
}

func checkExplainJSON(t *testing.T, kv map[string]any) {
	t.Helper()
	x, ok := kv["explain"].(map[string]any)
	if !ok {
		t.Fatalf("kv_cache without explain: %v", kv)
	}
	layers := x["layers"].([]any)
	l0 := layers[0].(map[string]any)
	img := l0["image"].(map[string]any)
	if len(layers) != 1 || img["entries"] != 4.0 || img["merged"] != 1.0 || img["decode_evicted"] != 0.0 {
		t.Fatalf("layers %v", layers)
	}
	for _, k := range []string{"system", "question", "template", "answer"} {
		if _, ok := l0[k]; !ok {
			t.Fatalf("layer lacks %s: %v", k, l0)
		}
	}
	im := x["images"].([]any)[0].(map[string]any)
	if im["rows"] != 2.0 || im["cols"] != 2.0 || im["states"].([]any)[0] != "kmke" || im["anchors"].([]any)[0].([]any)[1] != 3.0 {
		t.Fatalf("image %v", im)
	}
	if _, ok := im["queries"]; ok {
		t.Fatalf("a grid with queries: %v", im)
	}
	tile := im["tiles"].([]any)[0].(map[string]any)
	if tile["start"] != 3.0 || tile["offset"] != 0.0 || tile["entries"] != 4.0 {
		t.Fatalf("tile %v", tile)
	}
	spans := x["spans"].([]any)
	if len(spans) != 3 || spans[1].(map[string]any)["region"] != "image" || spans[0].(map[string]any)["text"] != "<s>U:" {
		t.Fatalf("spans %v", spans)
	}
}

// kv_cache.explain reaches the JSON body, and an explained stream carries it on
// its last chunk, with or without a usage chunk.
func TestExplainOnTheWire(t *testing.T) {
	fb := newFake()
	fb.events = explainEvents()
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"elastic_cache": map[string]any{"explain": true}}))
	if w.Code != 200 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	var m map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	checkExplainJSON(t, m["kv_cache"].(map[string]any))
	if !fb.requests[0].Explain {
		t.Fatal("the engine was not asked to explain")
	}

	for _, usage := range []bool{false, true} {
		body := map[string]any{"stream": true, "elastic_cache": map[string]any{"explain": true}}
		if usage {
			body["stream_options"] = map[string]any{"include_usage": true}
		}
		w := postChat(h, chatBody(t, body))
		events := sseEvents(t, w.Body.String())
		if events[len(events)-1] != "[DONE]" {
			t.Fatalf("last event %q", events[len(events)-1])
		}
		var last map[string]any
		if err := json.Unmarshal([]byte(events[len(events)-2]), &last); err != nil {
			t.Fatal(err)
		}
		checkExplainJSON(t, last["kv_cache"].(map[string]any))
		for _, e := range events[:len(events)-2] {
			if strings.Contains(e, `"kv_cache"`) {
				t.Fatalf("usage %v: kv_cache before the last chunk: %s", usage, e)
			}
		}
	}
}

// Without explain nothing changes: no explain in the body, no kv_cache on a
// stream's finish chunk.
func TestNoExplainWhenOff(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{}))
	if strings.Contains(w.Body.String(), `"explain"`) || fb.requests[0].Explain {
		t.Fatalf("explain without asking: %s", w.Body)
	}
	w = postChat(h, chatBody(t, map[string]any{"stream": true}))
	if strings.Contains(w.Body.String(), `"kv_cache"`) {
		t.Fatalf("kv_cache in a stream without usage: %s", w.Body)
	}
}
