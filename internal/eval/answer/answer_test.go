package answer

import (
	"reflect"
	"testing"
)

func TestNormalize(t *testing.T) {
	got := Normalize("The 3 red circles, an apple and 25 A's")
	want := []string{"three", "red", "circles", "apple", "and", "25", "s"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestCorrect(t *testing.T) {
	for _, c := range []struct {
		gen, ref string
		want     bool
	}{
		{"red", "red", true},
		{"Red.", "red", true},
		{"The circle is red.", "red", true},
		{"reddish", "red", false},
		{"blue", "red", false},
		{"There are 3 shapes.", "three", true},
		{"three", "3", true},
		{"thirty", "three", false},
		{"It is at the top left.", "top left", true},
		{"It is at the left top.", "top left", false},
		{"top, left", "top left", true},
		{"No, there is no blue square.", "no", true},
		{"Yes, but no.", "no", false},
		{"I think so", "yes", false},
		{"yes", "yes", true},
		{"anything", "", false},
		{"anything", "the", false},
	} {
		if got := Correct(c.gen, c.ref); got != c.want {
			t.Errorf("Correct(%q, %q) = %v, want %v", c.gen, c.ref, got, c.want)
		}
	}
}

func TestShort(t *testing.T) {
	for ref, want := range map[string]bool{"red": true, "top left": true, "the bottom right": true, "": false,
		"A large red circle is at the top left.": false} {
		if got := Short(ref); got != want {
			t.Errorf("Short(%q) = %v", ref, got)
		}
	}
}
