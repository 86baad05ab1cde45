package shapes

import (
	"bytes"
	"image/png"
	"slices"
	"strings"
	"testing"
)

func TestDeterministicAndIndependentOfN(t *testing.T) {
	a := Generate(7, 12)
	b := Generate(7, 12)
	c := Generate(7, 5)
	for i := range a {
		pa, err := a[i].PNG()
		if err != nil {
			t.Fatal(err)
		}
		pb, _ := b[i].PNG()
		if !bytes.Equal(pa, pb) || !slices.Equal(a[i].QAs, b[i].QAs) || a[i].ID != b[i].ID {
			t.Fatalf("sample %d differs between two runs with the same seed", i)
		}
		if i < len(c) {
			pc, _ := c[i].PNG()
			if !bytes.Equal(pa, pc) || !slices.Equal(a[i].QAs, c[i].QAs) {
				t.Fatalf("sample %d depends on n", i)
			}
		}
		one, err := New(DefaultOptions(), 7, i)
		if err != nil || !slices.Equal(one.QAs, a[i].QAs) {
			t.Fatalf("New(%d) differs from Generate", i)
		}
	}
	if a[0].ID != "shapes-000000" || a[11].ID != "shapes-000011" {
		t.Fatalf("IDs %q %q", a[0].ID, a[11].ID)
	}
	other := Generate(8, 12)
	same := 0
	for i := range a {
		if slices.Equal(a[i].QAs, other[i].QAs) {
			same++
		}
	}
	if same > 2 {
		t.Fatalf("seeds 7 and 8 gave %d identical samples of 12", same)
	}
}

// A pinned value: changing the generator changes datasets, which must be deliberate.
func TestPinnedSample(t *testing.T) {
	s := Generate(1, 1)[0]
	d, _ := s.QA(Describe)
	const want = "There are four shapes in the image. A small black circle is at the top right. " +
		"A large red cross is on the left. A small blue diamond is on the right. A large purple square is at the bottom right."
	if d.Answer != want {
		t.Fatalf("seed 1 sample 0 is now %q", d.Answer)
	}
}

func TestSamplesAreConsistent(t *testing.T) {
	validPos := map[string]bool{}
	for _, row := range Positions {
		for _, p := range row {
			validPos[p] = true
		}
	}
	counts := map[int]int{}
	answers := map[QAKind]map[string]bool{}
	for _, s := range Generate(3, 400) {
		if b := s.Image.Bounds(); b.Dx() < 96 || b.Dy() < 96 {
			t.Fatalf("%s: image %v", s.ID, b)
		}
		n := len(s.Shapes)
		if n < 1 || n > 4 {
			t.Fatalf("%s: %d shapes", s.ID, n)
		}
		counts[n]++
		kinds, colors, cells := map[Kind]bool{}, map[string]bool{}, map[int]bool{}
		for _, sh := range s.Shapes {
			if kinds[sh.Kind] || colors[sh.Color.Name] || cells[sh.Row*3+sh.Col] {
				t.Fatalf("%s: repeated kind, color or cell", s.ID)
			}
			kinds[sh.Kind], colors[sh.Color.Name], cells[sh.Row*3+sh.Col] = true, true, true
			// The shape is painted where it is said to be, in its color.
			if got := s.Image.RGBAAt(sh.Center.X, sh.Center.Y); got != sh.Color.RGBA {
				t.Fatalf("%s: pixel at the %s's center is %v, want %v", s.ID, sh.Kind, got, sh.Color.RGBA)
			}
			cell := s.Image.Bounds().Dx() / 3
			if sh.Center.X-sh.Radius < sh.Col*cell || sh.Center.X+sh.Radius >= (sh.Col+1)*cell ||
				sh.Center.Y-sh.Radius < sh.Row*cell || sh.Center.Y+sh.Radius >= (sh.Row+1)*cell {
				t.Fatalf("%s: the %s leaves its grid cell", s.ID, sh.Kind)
			}
		}
		if len(s.QAs) != len(QAKinds) {
			t.Fatalf("%s: %d questions", s.ID, len(s.QAs))
		}
		for i, qa := range s.QAs {
			if qa.Kind != QAKinds[i] || qa.Question == "" || qa.Answer == "" {
				t.Fatalf("%s: question %d is %+v", s.ID, i, qa)
			}
			if answers[qa.Kind] == nil {
				answers[qa.Kind] = map[string]bool{}
			}
			answers[qa.Kind][qa.Answer] = true
			switch qa.Kind {
			case Describe:
				if l := len(qa.Answer); l < 60 || l > 200 {
					t.Fatalf("%s: description is %d bytes: %q", s.ID, l, qa.Answer)
				}
				if strings.Count(qa.Answer, ". ")+1 < n {
					t.Fatalf("%s: description %q has fewer sentences than shapes", s.ID, qa.Answer)
				}
			case ColorOf:
				found := false
				for _, sh := range s.Shapes {
					found = found || qa.Question == "What color is the "+string(sh.Kind)+"?" && qa.Answer == sh.Color.Name
				}
				if !found {
					t.Fatalf("%s: %q -> %q is wrong", s.ID, qa.Question, qa.Answer)
				}
			case Count:
				if qa.Answer != countWords[n] {
					t.Fatalf("%s: count %q for %d shapes", s.ID, qa.Answer, n)
				}
			case Where:
				found := false
				for _, sh := range s.Shapes {
					found = found || qa.Question == "Where is the "+string(sh.Kind)+"?" && qa.Answer == sh.Position()
				}
				if !found || !validPos[qa.Answer] {
					t.Fatalf("%s: %q -> %q is wrong", s.ID, qa.Question, qa.Answer)
				}
			case Exists:
				present := false
				for _, sh := range s.Shapes {
					q := "Is there " + article(sh.Color.Name) + " " + sh.Color.Name + " " + string(sh.Kind) + "?"
					present = present || q == qa.Question
				}
				if want := map[bool]string{true: "yes", false: "no"}[present]; qa.Answer != want {
					t.Fatalf("%s: %q -> %q, want %q", s.ID, qa.Question, qa.Answer, want)
				}
			}
		}
		if n < 4 && s.QAs[0].Answer[:len("There ")] != "There " {
			t.Fatalf("%s: short description without its opening: %q", s.ID, s.QAs[0].Answer)
		}
	}
	for n := 1; n <= 4; n++ {
		if counts[n] < 50 {
			t.Errorf("only %d of 400 samples have %d shapes", counts[n], n)
		}
	}
	if len(answers[Exists]) != 2 || len(answers[ColorOf]) != len(Colors) || len(answers[Where]) != 9 {
		t.Errorf("answers are not varied: %v", answers)
	}
}

func TestPNGRoundTrip(t *testing.T) {
	s := Generate(2, 1)[0]
	b, err := s.PNG()
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if img.Bounds() != s.Image.Bounds() {
		t.Fatalf("bounds %v", img.Bounds())
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, o := range []Options{{Size: 64, MinShapes: 1, MaxShapes: 4}, {Size: 96, MinShapes: 0, MaxShapes: 4},
		{Size: 96, MinShapes: 1, MaxShapes: 5}, {Size: 96, MinShapes: 3, MaxShapes: 2}, {Size: 96, MinShapes: 1, MaxShapes: 4, IDPrefix: "a/b"}} {
		if _, err := GenerateWith(o, 1, 1); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
	big := DefaultOptions()
	big.Size = 336
	s, err := New(big, 1, 0)
	if err != nil || s.Image.Bounds().Dx() != 336 {
		t.Fatalf("336: %v", err)
	}
}
