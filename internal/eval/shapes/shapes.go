// Package shapes draws small synthetic pictures (1 to 4 colored shapes on a
// white canvas, placed on a 3x3 grid) and writes questions about them with
// exact answers: a description, the color of a shape, the number of shapes,
// where a shape is, and whether a given colored shape is present.
//
// Everything is a pure function of (seed, index): sample i is the same whether
// 5 or 5,000 samples are generated, on every platform and Go version (the
// package uses its own SplitMix64 generator, not math/rand). It serves the
// elastic-eval synthetic dataset and can feed the training of a tiny demo VLM.
//
//	for _, s := range shapes.Generate(1, 100) {
//		png, _ := s.PNG()
//		for _, qa := range s.QAs { ... qa.Question, qa.Answer ... }
//	}
package shapes

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"slices"
	"strings"
)

// Kind is a shape's form.
type Kind string

// The shape kinds drawn.
const (
	Circle   Kind = "circle"
	Square   Kind = "square"
	Triangle Kind = "triangle"
	Diamond  Kind = "diamond"
	Cross    Kind = "cross"
)

// Kinds lists every shape kind.
var Kinds = []Kind{Circle, Square, Triangle, Diamond, Cross}

// Color is a named fill color.
type Color struct {
	Name string
	RGBA color.RGBA
}

// Colors lists the fill colors (none is close to the white background).
var Colors = []Color{
	{"red", color.RGBA{220, 40, 40, 255}},
	{"green", color.RGBA{40, 170, 60, 255}},
	{"blue", color.RGBA{40, 80, 220, 255}},
	{"yellow", color.RGBA{235, 205, 20, 255}},
	{"orange", color.RGBA{245, 135, 20, 255}},
	{"purple", color.RGBA{140, 55, 180, 255}},
	{"black", color.RGBA{20, 20, 20, 255}},
	{"gray", color.RGBA{128, 128, 128, 255}},
}

// Background is the canvas color.
var Background = color.RGBA{255, 255, 255, 255}

// Size is a shape's size class.
type Size string

// The size classes: the radius is about 22% or 40% of a grid cell.
const (
	Small Size = "small"
	Large Size = "large"
)

// Positions names the 3x3 grid cells, row by row, as the answers give them.
var Positions = [3][3]string{
	{"top left", "top", "top right"},
	{"left", "center", "right"},
	{"bottom left", "bottom", "bottom right"},
}

// Shape is one drawn shape.
type Shape struct {
	Kind     Kind
	Color    Color
	Size     Size
	Row, Col int         // grid cell, 0..2 each
	Center   image.Point // pixel center
	Radius   int         // half the side of the shape's bounding square, in pixels
}

// Position is the grid cell's name, e.g. "top left" or "center".
func (s Shape) Position() string { return Positions[s.Row][s.Col] }

// Where is the position as a phrase that follows "is": "at the top left",
// "on the right", "in the center".
func (s Shape) Where() string {
	switch p := s.Position(); p {
	case "center":
		return "in the center"
	case "left", "right":
		return "on the " + p
	default:
		return "at the " + p
	}
}

// Sentence describes the shape: "A large red circle is at the top left."
func (s Shape) Sentence() string {
	return fmt.Sprintf("A %s %s %s is %s.", s.Size, s.Color.Name, s.Kind, s.Where())
}

// Contains reports whether pixel (x, y) is painted by the shape.
func (s Shape) Contains(x, y int) bool {
	dx, dy, r := x-s.Center.X, y-s.Center.Y, s.Radius
	if dx < -r || dx > r || dy < -r || dy > r {
		return false
	}
	switch s.Kind {
	case Circle:
		return dx*dx+dy*dy <= r*r
	case Square:
		return true
	case Triangle: // apex up, base at the bottom of the bounding square
		return 2*abs(dx) <= dy+r
	case Diamond:
		return abs(dx)+abs(dy) <= r
	case Cross:
		arm := max(1, r/3)
		return abs(dx) <= arm || abs(dy) <= arm
	}
	return false
}

// QAKind names a question type.
type QAKind string

// The question types, in the order they appear in Sample.QAs.
const (
	Describe QAKind = "describe" // answer: one sentence per shape, 60 to 200 bytes
	ColorOf  QAKind = "color"    // answer: a color name
	Count    QAKind = "count"    // answer: a number word, "one" to "four"
	Where    QAKind = "position" // answer: a grid cell name from Positions
	Exists   QAKind = "exists"   // answer: "yes" or "no"
)

// QAKinds lists every question type.
var QAKinds = []QAKind{Describe, ColorOf, Count, Where, Exists}

// Short reports whether the kind's answer is a short exact answer (every kind
// but Describe), suitable for accuracy scoring.
func (k QAKind) Short() bool { return k != Describe }

// QA is one question about a sample's image with its exact answer.
type QA struct {
	Kind     QAKind
	Question string
	Answer   string
}

// Sample is one picture with its shapes and questions.
type Sample struct {
	ID     string
	Index  int
	Image  *image.RGBA
	Shapes []Shape // in reading order (row by row, left to right)
	QAs    []QA    // one per kind, in QAKinds order
}

// PNG encodes the image.
func (s *Sample) PNG() ([]byte, error) {
	var buf bytes.Buffer
	if err := png.Encode(&buf, s.Image); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// QA returns the sample's question of the given kind.
func (s *Sample) QA(kind QAKind) (QA, bool) {
	for _, q := range s.QAs {
		if q.Kind == kind {
			return q, true
		}
	}
	return QA{}, false
}

// Options shape the generated samples.
type Options struct {
	Size      int    // canvas side in pixels, at least 96
	MinShapes int    // at least 1
	MaxShapes int    // at most 4
	IDPrefix  string // sample IDs are "<prefix>-<index, 6 digits>"
}

// DefaultOptions: 96x96 pictures with 1 to 4 shapes, IDs "shapes-000000"...
func DefaultOptions() Options {
	return Options{Size: 96, MinShapes: 1, MaxShapes: 4, IDPrefix: "shapes"}
}

// Validate checks the options.
func (o Options) Validate() error {
	switch {
	case o.Size < 96:
		return fmt.Errorf("shapes: size %d is below 96 pixels", o.Size)
	case o.Size > 4096:
		return fmt.Errorf("shapes: size %d is above 4096 pixels", o.Size)
	case o.MinShapes < 1 || o.MaxShapes > 4 || o.MinShapes > o.MaxShapes:
		return fmt.Errorf("shapes: shape count range [%d, %d] is not within [1, 4]", o.MinShapes, o.MaxShapes)
	case strings.ContainsAny(o.IDPrefix, "/\\"):
		return errors.New("shapes: the ID prefix must not contain a path separator")
	}
	return nil
}

// Generate returns samples 0..n-1 for seed with DefaultOptions.
func Generate(seed int64, n int) []Sample {
	out, err := GenerateWith(DefaultOptions(), seed, n)
	if err != nil {
		panic(err) // the defaults are valid
	}
	return out
}

// GenerateWith returns samples 0..n-1 for seed.
func GenerateWith(o Options, seed int64, n int) ([]Sample, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	out := make([]Sample, max(n, 0))
	for i := range out {
		out[i] = newSample(o, seed, i)
	}
	return out, nil
}

// New returns sample index alone (the same as GenerateWith(o, seed, n)[index]).
func New(o Options, seed int64, index int) (Sample, error) {
	if err := o.Validate(); err != nil {
		return Sample{}, err
	}
	return newSample(o, seed, index), nil
}

func newSample(o Options, seed int64, index int) Sample {
	r := newRNG(uint64(seed), uint64(index))
	n := o.MinShapes + r.intn(o.MaxShapes-o.MinShapes+1)
	kinds := r.perm(len(Kinds))
	colors := r.perm(len(Colors))
	cells := r.perm(9)[:n]
	slices.Sort(cells) // reading order
	cell := o.Size / 3
	s := Sample{ID: fmt.Sprintf("%s-%06d", o.IDPrefix, index), Index: index}
	for i, c := range cells {
		sh := Shape{Kind: Kinds[kinds[i]], Color: Colors[colors[i]], Size: Small, Row: c / 3, Col: c % 3}
		frac := 0.22
		if r.intn(2) == 1 {
			sh.Size, frac = Large, 0.40
		}
		sh.Radius = max(3, int(frac*float64(cell)+0.5))
		slack := max(0, cell/2-sh.Radius-1)
		sh.Center = image.Pt(sh.Col*cell+cell/2+r.intn(2*slack+1)-slack, sh.Row*cell+cell/2+r.intn(2*slack+1)-slack)
		s.Shapes = append(s.Shapes, sh)
	}
	s.Image = draw(o.Size, s.Shapes)
	s.QAs = questions(r, s.Shapes)
	return s
}

func draw(size int, shapes []Shape) *image.RGBA {
	img := image.NewRGBA(image.Rect(0, 0, size, size))
	for i := 0; i < len(img.Pix); i += 4 {
		img.Pix[i], img.Pix[i+1], img.Pix[i+2], img.Pix[i+3] = Background.R, Background.G, Background.B, 255
	}
	for _, sh := range shapes {
		for y := sh.Center.Y - sh.Radius; y <= sh.Center.Y+sh.Radius; y++ {
			for x := sh.Center.X - sh.Radius; x <= sh.Center.X+sh.Radius; x++ {
				if image.Pt(x, y).In(img.Rect) && sh.Contains(x, y) {
					img.SetRGBA(x, y, sh.Color.RGBA)
				}
			}
		}
	}
	return img
}

var countWords = []string{"zero", "one", "two", "three", "four"}

// Description is the answer to the Describe question: an optional opening
// sentence with the count, then one sentence per shape in reading order. The
// opening is left out when the text would exceed 200 bytes.
func Description(shapes []Shape) string {
	var b strings.Builder
	for i, sh := range shapes {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(sh.Sentence())
	}
	intro := "There is one shape in the image."
	if len(shapes) != 1 {
		intro = fmt.Sprintf("There are %s shapes in the image.", countWords[len(shapes)])
	}
	if len(intro)+1+b.Len() <= 200 {
		return intro + " " + b.String()
	}
	return b.String()
}

func article(word string) string {
	if strings.ContainsRune("aeiou", rune(word[0])) {
		return "an"
	}
	return "a"
}

func questions(r *rng, shapes []Shape) []QA {
	colorT := shapes[r.intn(len(shapes))]
	whereT := shapes[r.intn(len(shapes))]
	qas := []QA{
		{Describe, "Describe the image.", Description(shapes)},
		{ColorOf, fmt.Sprintf("What color is the %s?", colorT.Kind), colorT.Color.Name},
		{Count, "How many shapes are there?", countWords[len(shapes)]},
		{Where, fmt.Sprintf("Where is the %s?", whereT.Kind), whereT.Position()},
	}
	// Exists: half the time a shape that is there, otherwise a color and kind
	// pair that is not (a present kind in another color, or an absent kind).
	var col string
	var kind Kind
	ans := "yes"
	if r.intn(2) == 0 {
		t := shapes[r.intn(len(shapes))]
		col, kind = t.Color.Name, t.Kind
	} else {
		ans = "no"
		for {
			col, kind = Colors[r.intn(len(Colors))].Name, Kinds[r.intn(len(Kinds))]
			present := false
			for _, sh := range shapes {
				present = present || sh.Color.Name == col && sh.Kind == kind
			}
			if !present {
				break
			}
		}
	}
	qas = append(qas, QA{Exists, fmt.Sprintf("Is there %s %s %s?", article(col), col, kind), ans})
	return qas
}

// rng is SplitMix64, seeded from (seed, index) so that samples are independent.
type rng struct{ s uint64 }

func newRNG(seed, index uint64) *rng {
	r := &rng{s: seed*0x9E3779B97F4A7C15 ^ 0xD1B54A32D192ED03}
	r.s ^= r.next() + index*0xBF58476D1CE4E5B9
	r.next()
	return r
}

func (r *rng) next() uint64 {
	r.s += 0x9E3779B97F4A7C15
	z := r.s
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// intn is uniform in [0, n) (n > 0), by rejection to avoid modulo bias.
func (r *rng) intn(n int) int {
	un := uint64(n)
	limit := ^uint64(0) - ^uint64(0)%un
	for {
		if v := r.next(); v < limit {
			return int(v % un)
		}
	}
}

// perm is a Fisher-Yates permutation of 0..n-1.
func (r *rng) perm(n int) []int {
	p := make([]int, n)
	for i := range p {
		p[i] = i
	}
	for i := n - 1; i > 0; i-- {
		j := r.intn(i + 1)
		p[i], p[j] = p[j], p[i]
	}
	return p
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}
