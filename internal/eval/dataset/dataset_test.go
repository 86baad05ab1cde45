package dataset

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadLLaVAFormat(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "img", "a.png"), "x")
	writeFile(t, filepath.Join(dir, "img", "b.png"), "x")
	writeFile(t, filepath.Join(dir, "set.json"), `[
	 {"id": "s1", "image": "a.png", "conversations": [
	   {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": " A cat. "},
	   {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "ignored"}]},
	 {"id": 42, "image": "b.png", "kind": "color", "conversations": [
	   {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]},
	 {"id": "s3", "image": "missing.png", "conversations": [
	   {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
	 {"id": "s4", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
	 {"id": "s5", "conversations": "not a list"},
	 {"conversations": [{"from": "user", "value": "text only"}, {"from": "assistant", "value": "ok"}]},
	 {"id": "s7", "conversations": [{"from": "human", "value": "<image> no file"}, {"from": "gpt", "value": "A"}]},
	 17
	]`)
	set, err := Load(filepath.Join(dir, "set.json"), filepath.Join(dir, "img"))
	if err != nil {
		t.Fatal(err)
	}
	if set.Format != "llava" {
		t.Errorf("format %q", set.Format)
	}
	var ids []string
	for _, s := range set.Samples {
		ids = append(ids, s.ID)
	}
	if !slices.Equal(ids, []string{"s1", "42", "#5"}) {
		t.Fatalf("samples %q", ids)
	}
	s := set.Samples[0]
	if s.Prompt != "<image>\nWhat is it?" || s.Answer != "A cat." || s.Image != filepath.Join(dir, "img", "a.png") || s.Index != 0 {
		t.Errorf("sample 0: %+v", s)
	}
	// No <image> in the text: the marker is put in front.
	if p := set.Samples[1].Prompt; p != "<image>\nColor?" || set.Samples[1].Kind != "color" {
		t.Errorf("sample 1: %+v", set.Samples[1])
	}
	if set.Samples[2].Image != "" || set.Samples[2].Prompt != "text only" {
		t.Errorf("text-only sample: %+v", set.Samples[2])
	}
	want := map[int]string{2: `id "s3" (entry 2): image`, 3: `id "s4" (entry 3): malformed entry: human turn 0 is not followed`,
		4: `id "s5" (entry 4): malformed entry`, 6: `id "s7" (entry 6): malformed entry: the prompt has <image> but there is no "image"`,
		7: `entry 7: malformed entry`}
	if len(set.Skipped) != len(want) {
		t.Fatalf("skipped %v", set.Skipped)
	}
	for _, sk := range set.Skipped {
		if w, ok := want[sk.Index]; !ok || !strings.HasPrefix(sk.String(), w) {
			t.Errorf("skip %q, want prefix %q", sk.String(), w)
		}
	}
	if !strings.Contains(set.Skipped[0].Reason, "missing.png") {
		t.Errorf("missing image message does not name the file: %q", set.Skipped[0].Reason)
	}
}

func TestLoadPlainFormatDefaultsToTheJSONFolder(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pics", "c.jpg"), "x")
	writeFile(t, filepath.Join(dir, "q.json"), `[
	 {"question": "How many?", "answer": "3", "image": "pics/c.jpg"},
	 {"id": "p2", "question": "Text only?", "answer": "yes"},
	 {"id": "p3", "question": "", "answer": "yes"},
	 {"id": "p4", "question": "No answer?"},
	 {"id": "p5", "answer": "x", "image": "pics/c.jpg"}
	]`)
	set, err := Load(filepath.Join(dir, "q.json"), "")
	if err != nil {
		t.Fatal(err)
	}
	if set.Format != "plain" || len(set.Samples) != 2 || len(set.Skipped) != 3 {
		t.Fatalf("format %q, samples %+v, skipped %v", set.Format, set.Samples, set.Skipped)
	}
	s := set.Samples[0]
	if s.ID != "#0" || s.Name() != "entry 0" || s.Prompt != "<image>\nHow many?" || s.Answer != "3" || s.Image != filepath.Join(dir, "pics", "c.jpg") {
		t.Errorf("sample 0: %+v", s)
	}
	for i, id := range []string{"p3", "p4", "p5"} {
		if sk := set.Skipped[i]; sk.ID != id || !strings.Contains(sk.String(), `id "`+id+`"`) {
			t.Errorf("skip %d: %v", i, sk)
		}
	}
}

func TestMixedAndBrokenFiles(t *testing.T) {
	dir := t.TempDir()
	set, err := Parse([]byte(`[{"question":"q","answer":"a"},{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}]`), dir)
	if err != nil || set.Format != "mixed" || len(set.Samples) != 2 {
		t.Fatalf("%v %+v", err, set)
	}
	if _, err := Parse([]byte(`{"not": "a list"}`), dir); err == nil {
		t.Fatal("an object was accepted")
	}
	if _, err := Load(filepath.Join(dir, "none.json"), ""); err == nil {
		t.Fatal("a missing file was accepted")
	}
}

func TestSelect(t *testing.T) {
	var all []Sample
	for i := range 20 {
		all = append(all, Sample{Index: i})
	}
	a, b := Select(all, 5, 1), Select(all, 5, 1)
	if len(a) != 5 || !slices.EqualFunc(a, b, func(x, y Sample) bool { return x.Index == y.Index }) {
		t.Fatalf("not deterministic: %v %v", a, b)
	}
	if !slices.IsSortedFunc(a, func(x, y Sample) int { return x.Index - y.Index }) {
		t.Fatalf("not in file order: %v", a)
	}
	c := Select(all, 5, 2)
	if slices.EqualFunc(a, c, func(x, y Sample) bool { return x.Index == y.Index }) {
		t.Fatalf("seed does not matter")
	}
	if len(Select(all, 0, 1)) != 20 || len(Select(all, 50, 1)) != 20 {
		t.Fatal("n <= 0 or n >= len must keep everything")
	}
}

func TestWriteSyntheticRoundTrip(t *testing.T) {
	dir := t.TempDir()
	res, err := WriteSynthetic(SynthOptions{Dir: dir, N: 5, Seed: 3, Shapes: shapes.DefaultOptions(), HeldOut: 0.4})
	if err != nil {
		t.Fatal(err)
	}
	if res.Images != 5 || len(res.Files) != 2 {
		t.Fatalf("%+v", res)
	}
	train, err := Load(filepath.Join(dir, "train.json"), "")
	if err != nil {
		t.Fatal(err)
	}
	held, err := Load(filepath.Join(dir, "heldout.json"), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(train.Samples) != 3*len(shapes.QAKinds) || len(held.Samples) != 2*len(shapes.QAKinds) || len(train.Skipped)+len(held.Skipped) != 0 {
		t.Fatalf("train %d, held-out %d, skipped %v %v", len(train.Samples), len(held.Samples), train.Skipped, held.Skipped)
	}
	want := shapes.Generate(3, 5)
	s := held.Samples[1]
	qa, _ := want[3].QA(shapes.ColorOf)
	if s.ID != "shapes-000003-color" || s.Kind != "color" || s.Answer != qa.Answer || s.Prompt != "<image>\n"+qa.Question {
		t.Fatalf("held-out sample 1: %+v", s)
	}
	// Deterministic bytes, and kinds can be restricted.
	dir2 := t.TempDir()
	if _, err := WriteSynthetic(SynthOptions{Dir: dir2, N: 5, Seed: 3, Shapes: shapes.DefaultOptions(), HeldOut: 0.4}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"train.json", "heldout.json", "images/shapes-000004.png"} {
		a, _ := os.ReadFile(filepath.Join(dir, f))
		b, _ := os.ReadFile(filepath.Join(dir2, f))
		if len(a) == 0 || string(a) != string(b) {
			t.Errorf("%s differs between two runs", f)
		}
	}
	dir3 := t.TempDir()
	res, err = WriteSynthetic(SynthOptions{Dir: dir3, N: 2, Seed: 3, Shapes: shapes.DefaultOptions(), Kinds: []shapes.QAKind{shapes.Describe}})
	if err != nil || res.Entries[filepath.Join(dir3, "data.json")] != 2 {
		t.Fatalf("%v %+v", err, res)
	}
	if _, err := WriteSynthetic(SynthOptions{Dir: dir3, N: 2, Shapes: shapes.DefaultOptions(), Kinds: []shapes.QAKind{"size"}}); err == nil {
		t.Fatal("unknown kind accepted")
	}
}
