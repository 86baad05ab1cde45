package engine

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

const shapeSchema = `{"type":"object","properties":{"color":{"enum":["red","green","blue"]},` +
	`"count":{"type":"integer","minimum":0,"maximum":9},"tags":{"type":"array","items":{"type":"string","maxLength":4},"maxItems":2}},` +
	`"required":["color","count","tags"],"additionalProperties":false}`

type shapeAnswer struct {
	Color string   `json:"color"`
	Count int      `json:"count"`
	Tags  []string `json:"tags"`
}

func checkShape(t *testing.T, text string) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(text))
	dec.DisallowUnknownFields()
	var a shapeAnswer
	if err := dec.Decode(&a); err != nil {
		t.Fatalf("answer %q does not match the schema: %v", text, err)
	}
	if !strings.Contains("red green blue", a.Color) || a.Color == "" || a.Count < 0 || a.Count > 9 || len(a.Tags) > 2 {
		t.Fatalf("answer %q breaks the schema's bounds", text)
	}
	for _, tag := range a.Tags {
		if len([]rune(tag)) > 4 {
			t.Fatalf("answer %q: tag longer than maxLength", text)
		}
	}
	if strings.ContainsAny(text, " \n\t") {
		t.Fatalf("answer %q holds whitespace between tokens", text)
	}
}

// A random model follows no format of its own, so only the grammar makes its
// answer match: under every policy (the constraint acts on sampling, the policies
// on the cache) the answer is compact JSON that matches, and generation ends there.
func TestConstraintGivesSchemaJSONUnderEveryPolicy(t *testing.T) {
	e := startEngine(t, Options{})
	img := testPNG(t, 3)
	for _, spec := range []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5), cfg(elasticcache.H2O, 0.5), cfg(elasticcache.Local, 0.5)} {
		t.Run(string(spec.Policy()), func(t *testing.T) {
			req := greedyReq("json-"+string(spec.Policy()), "Describe the shape as JSON.", 200, spec, img)
			req.Constraint = &completion.Constraint{Schema: []byte(shapeSchema)}
			r := run(t, e, req)
			if r.finish != completion.FinishStop {
				t.Fatalf("finish %q after %q", r.finish, r.text)
			}
			checkShape(t, r.text)
		})
	}
}

// With OrText the answer is either text that does not open with "{" or JSON
// that matches; and the same request without a constraint decodes the same text
// when that text does not open with "{": the grammar then does not intervene, up
// to the first non-ASCII byte (a random model strings bytes into invalid UTF-8,
// which the grammar does not allow).
func TestConstraintOrText(t *testing.T) {
	e := startEngine(t, Options{})
	for i, prompt := range []string{"Call a tool or answer.", "What is the weather?", "{"} {
		req := greedyReq("ortext", prompt, 24, elasticcache.Spec{})
		req.Constraint = &completion.Constraint{Schema: []byte(shapeSchema), OrText: true}
		r := run(t, e, req)
		trimmed := strings.TrimLeft(r.text, " \t\r\n")
		if strings.HasPrefix(trimmed, "{") {
			if r.finish != completion.FinishStop {
				t.Fatalf("%d: a call was cut off: %q", i, r.text)
			}
			checkShape(t, trimmed)
			continue
		}
		free := run(t, e, greedyReq("free", prompt, 24, elasticcache.Spec{}))
		if strings.HasPrefix(strings.TrimLeft(free.text, " \t\r\n"), "{") {
			continue
		}
		ascii := func(s string) string {
			if i := strings.IndexFunc(s, func(r rune) bool { return r >= 0x80 }); i >= 0 {
				return s[:i]
			}
			return s
		}
		if a, b := ascii(r.text), ascii(free.text); a != b || a == "" {
			t.Fatalf("%d: text answer %q differs from the unconstrained %q", i, r.text, free.text)
		}
	}
}

// The answer prefix is prompt, the model continues it, and the constraint applies
// to what follows.
func TestAnswerPrefixIsPromptAndConstraintFollowsIt(t *testing.T) {
	e := startEngine(t, Options{})
	plain := run(t, e, greedyReq("plain", "Weather in Paris?", 1, elasticcache.Spec{}))
	req := greedyReq("prefix", "Weather in Paris?", 120, elasticcache.Spec{})
	req.AnswerPrefix = `{"tool_calls":[{"name":"get_weather","arguments":`
	req.Constraint = &completion.Constraint{Schema: []byte(`{"type":"object","properties":{"city":{"type":"string","maxLength":12}},"required":["city"]}`)}
	r := run(t, e, req)
	if r.usage.PromptTokens <= plain.usage.PromptTokens+5 {
		t.Fatalf("prompt tokens %d with the prefix, %d without", r.usage.PromptTokens, plain.usage.PromptTokens)
	}
	var args struct {
		City *string `json:"city"`
	}
	if err := json.Unmarshal([]byte(r.text), &args); err != nil || args.City == nil || strings.Contains(r.text, "tool_calls") {
		t.Fatalf("arguments %q: %v", r.text, err)
	}
}

func TestConstraintThatCannotBeConvertedIsRefusedAtSubmit(t *testing.T) {
	e := startEngine(t, Options{})
	for _, schema := range []string{`{"type":"string","pattern":"^[a-z$"}`, `{"type":"object","properties":{"a":{"$ref":"#/$defs/missing"}}}`, `not json`} {
		req := greedyReq("bad-schema", "hi", 4, elasticcache.Spec{})
		req.Constraint = &completion.Constraint{Schema: []byte(schema)}
		_, err := e.Submit(context.Background(), req)
		var ce *completion.ConstraintError
		if !errors.As(err, &ce) {
			t.Fatalf("%s: err %v, want a ConstraintError", schema, err)
		}
	}
	if st := e.Stats(); st.QueueDepth != 0 || st.SlotsBusy != 0 {
		t.Fatalf("a refused request left state behind: %+v", st)
	}
}

// Greedy decoding picks the most likely token, so each entry's token is its own
// top alternative; log-probabilities are a distribution's; and the entries spell
// the answer.
func TestLogprobsDescribeTheGreedyTokens(t *testing.T) {
	e := startEngine(t, Options{})
	req := greedyReq("logprobs", "Tell me about the picture.", 12, cfg(elasticcache.Elastic, 0.5), testPNG(t, 5))
	req.Logprobs, req.TopLogprobs = true, 5
	ch, err := e.Submit(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	var text, spelled strings.Builder
	var entries []completion.TokenLogprob
	for ev := range ch {
		text.WriteString(ev.Text)
		entries = append(entries, ev.Logprobs...)
		if ev.Done {
			if ev.Err != nil {
				t.Fatal(ev.Err)
			}
			if len(entries) != ev.Usage.CompletionTokens {
				t.Fatalf("%d entries for %d tokens", len(entries), ev.Usage.CompletionTokens)
			}
			break
		}
	}
	for i, lp := range entries {
		spelled.Write(lp.Bytes)
		if len(lp.Top) != 5 || lp.Top[0].Token != lp.Token || lp.Top[0].Logprob != lp.Logprob {
			t.Fatalf("entry %d: %+v", i, lp)
		}
		mass := 0.0
		for j, alt := range lp.Top {
			if alt.Logprob > 0 || (j > 0 && alt.Logprob > lp.Top[j-1].Logprob) {
				t.Fatalf("entry %d: alternatives not log-probabilities best first: %+v", i, lp.Top)
			}
			mass += math.Exp(alt.Logprob)
		}
		if mass > 1+1e-6 {
			t.Fatalf("entry %d: top mass %v > 1", i, mass)
		}
	}
	if spelled.String() != text.String() {
		t.Fatalf("entries spell %q, answer is %q", spelled.String(), text.String())
	}
}

func TestTopTokens(t *testing.T) {
	logits := []float32{0.5, 3, -1, 3, 2, 0.5}
	got := topTokens(logits, 4)
	want := []int{1, 3, 4, 0}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if int(got[i]) != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	if len(topTokens(logits, 0)) != 0 || len(topTokens(logits, 99)) != len(logits) {
		t.Fatal("k out of range")
	}
}
