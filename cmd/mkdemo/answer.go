package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// Question is one entry of the held-out file written by
// tools/demo-vlm/evaluate.py (models/demo/heldout.json).
type Question struct {
	ID        string `json:"id"`
	Image     string `json:"image"` // relative to the JSON file's folder
	Question  string `json:"question"`
	TextFirst bool   `json:"text_first"`
	System    string `json:"system,omitempty"` // system message before the question ("": none)
	Kind      string `json:"kind"`             // color, count, position, exists, describe
	Reference string `json:"reference"`        // ground truth
	Torch     string `json:"torch"`            // PyTorch greedy answer (export check)
}

// messages is the chat of q with its image: the system message, if any,
// then the user turn.
func (q Question) messages(img []byte) []completion.Message {
	user := userTurn(q.Question, img, q.TextFirst)
	if q.System == "" {
		return []completion.Message{user}
	}
	return []completion.Message{{Role: "system", Parts: []completion.Part{completion.Text(q.System)}}, user}
}

// QuestionFile is the held-out file.
type QuestionFile struct {
	Note      string     `json:"note"`
	Questions []Question `json:"questions"`
}

// ReadQuestions loads a held-out file and the images it names.
func ReadQuestions(path string) (*QuestionFile, map[string][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	var qf QuestionFile
	if err := json.Unmarshal(b, &qf); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	imgs := map[string][]byte{}
	for _, q := range qf.Questions {
		if _, ok := imgs[q.Image]; ok {
			continue
		}
		data, err := os.ReadFile(filepath.Join(filepath.Dir(path), q.Image))
		if err != nil {
			return nil, nil, err
		}
		imgs[q.Image] = data
	}
	return &qf, imgs, nil
}

// Answerer runs greedy requests on an engine.
type Answerer struct {
	Model  *llama.Model
	Vision *llama.Vision
	Engine *engine.Engine
}

// StartAnswerer loads dir's pair and starts an engine with parallel slots.
func StartAnswerer(dir string, parallel, threads int, kvType string) (*Answerer, error) {
	return startObserved(dir, parallel, threads, kvType, nil)
}

// startObserved is StartAnswerer with an Observe callback for the engine (nil: none).
func startObserved(dir string, parallel, threads int, kvType string, observe func(engine.Observation)) (*Answerer, error) {
	m, v, err := loadPair(dir, threads)
	if err != nil {
		return nil, err
	}
	e, err := engine.Start(m, v, engine.Options{
		Parallel: parallel, CtxSize: 1024 * parallel, BatchSize: 512, Threads: threads,
		KVType: kvType, Log: zerolog.Nop(), Observe: observe,
	})
	if err != nil {
		v.Close()
		m.Close()
		return nil, err
	}
	return &Answerer{Model: m, Vision: v, Engine: e}, nil
}

// Close stops the engine and frees the model.
func (a *Answerer) Close() {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // every Answer call has returned: nothing to wait for
	a.Engine.Stop(ctx)
	a.Vision.Close()
	a.Model.Close()
}

// Answer returns the greedy answers to qs (in order), with cache setting c.
func (a *Answerer) Answer(qs []Question, imgs map[string][]byte, c elasticcache.Spec, maxTokens int) ([]string, error) {
	type res struct {
		i    int
		text string
		err  error
	}
	out := make([]string, len(qs))
	results := make(chan res)
	sem := make(chan struct{}, 32) // stay under the engine's queue size
	go func() {
		for i, q := range qs {
			sem <- struct{}{}
			go func() {
				defer func() { <-sem }()
				req := &completion.Request{
					ID:        fmt.Sprintf("q%d", i),
					Messages:  q.messages(imgs[q.Image]),
					MaxTokens: maxTokens,
					Sampling:  completion.Sampling{Temperature: 0, RepeatPenalty: 1},
					Cache:     c,
				}
				out, err := a.Engine.Complete(context.Background(), req)
				results <- res{i: i, text: out.Text, err: err}
			}()
		}
	}()
	var errs []error
	for range qs {
		r := <-results
		if r.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", qs[r.i].ID, r.err))
		}
		out[r.i] = r.text
	}
	return out, errors.Join(errs...)
}

// Clean is the comparable form of a generated answer: without the leading
// space the vocabulary's space prefix produces and without trailing blanks.
func Clean(s string) string { return strings.TrimSpace(s) }

func answerCmd(fs *flag.FlagSet, args []string) error {
	dir := fs.String("dir", "models/demo", "folder with model.gguf and mmproj.gguf")
	qpath := fs.String("questions", "models/demo/heldout.json", "held-out questions")
	out := fs.String("out", "", "JSON output (required)")
	cache := addCacheFlags(fs, "full", 1)
	parallel := fs.Int("parallel", 4, "engine slots")
	threads := fs.Int("threads", 2, "threads")
	kvType := fs.String("kv-type", "", "KV cache type (default f16)")
	maxTokens := fs.Int("max-tokens", 256, "answer length limit")
	fs.Parse(args)
	if *out == "" {
		return errors.New("answer: --out is required")
	}
	qf, imgs, err := ReadQuestions(*qpath)
	if err != nil {
		return err
	}
	spec, err := cache.spec()
	if err != nil {
		return err
	}
	llama.Init(llama.LogError)
	a, err := StartAnswerer(*dir, *parallel, *threads, *kvType)
	if err != nil {
		return err
	}
	defer a.Close()
	start := time.Now()
	answers, err := a.Answer(qf.Questions, imgs, spec, *maxTokens)
	if err != nil {
		return err
	}
	type row struct {
		ID     string `json:"id"`
		Answer string `json:"answer"`
	}
	rows := make([]row, len(answers))
	same := 0
	for i, s := range answers {
		rows[i] = row{qf.Questions[i].ID, Clean(s)}
		if Clean(s) == qf.Questions[i].Torch {
			same++
		}
	}
	fmt.Printf("%d answers in %s; %d/%d equal to the PyTorch answers\n", len(rows), time.Since(start).Round(time.Millisecond), same, len(rows))
	b, _ := json.MarshalIndent(rows, "", " ")
	return os.WriteFile(*out, b, 0o644)
}

// cacheFlags are the cache setting flags of answer and plans.
type cacheFlags struct {
	policy, selection *string
	budget            *float64
	sink, distance    *int
}

// addCacheFlags registers --policy, --budget, --sink, --distance and --selection
// (the paper's rule unless asked: these tools compare with the paper).
func addCacheFlags(fs *flag.FlagSet, policy string, budget float64) *cacheFlags {
	return &cacheFlags{
		policy:    fs.String("policy", policy, "cache policy"),
		budget:    fs.Float64("budget", budget, "cache budget"),
		sink:      fs.Int("sink", elasticcache.DefaultSink, "sink entries"),
		distance:  fs.Int("distance", elasticcache.DefaultDistance, "elastic decode truncation offset"),
		selection: fs.String("selection", "paper", "elastic selection rule: paper, reference, normalized or text-tail"),
	}
}

// spec validates the flags into a cache setting.
func (f *cacheFlags) spec() (elasticcache.Spec, error) {
	p, err := elasticcache.ParsePolicy(*f.policy)
	if err != nil {
		return elasticcache.Spec{}, err
	}
	sel, err := elasticcache.ParseSelection(*f.selection)
	if err != nil {
		return elasticcache.Spec{}, err
	}
	return elasticcache.Config{Policy: p, Budget: *f.budget, Sink: *f.sink, Distance: *f.distance, Selection: sel}.Spec()
}
