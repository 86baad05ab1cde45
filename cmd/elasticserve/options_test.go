package main

import (
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/api"
	"github.com/elasticserve/elasticserve/config"
	"github.com/elasticserve/elasticserve/elasticcache"
)

func TestAPIOptions(t *testing.T) {
	tests := []struct {
		name string
		cfg  config.Config
		want api.Options
	}{
		{"every field", config.Config{ModelAlias: "m", APIKey: "k", CORSOrigins: " https://a.example ,http://localhost:5173",
			MaxBodyBytes: 100, MaxImageBytes: 50, MaxImages: 2, MaxImagePixels: 9, AllowImageURLs: true, AllowPrivateImageURLs: true,
			ImageURLTimeout: time.Second, RequestTimeout: time.Minute, MaxTokensDefault: 7, UI: true,
			Policy: "H2O", Budget: 0.5, Sink: 1, Distance: 2, Selection: "reference"},
			api.Options{ModelAlias: "m", APIKey: "k", CORSOrigins: []string{"https://a.example", "http://localhost:5173"},
				MaxBodyBytes: 100, MaxImageBytes: 50, MaxImages: 2, MaxImagePixels: 9, AllowImageURLs: true, AllowPrivateImageURLs: true,
				ImageURLTimeout: time.Second, RequestTimeout: time.Minute, DefaultMaxTokens: 7, UI: true,
				Cache: elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.5, Sink: 1, Distance: 2, Selection: elasticcache.ReferenceSelection})}},
		// -1 (no limit) is the API's 0; no origins is CORS off (nil).
		{"unset", config.Config{MaxTokensDefault: -1, Policy: "elastic", Budget: 0.8, Sink: 4, Distance: -25},
			api.Options{Cache: elasticcache.DefaultSpec()}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := apiOptions(&tt.cfg)
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("apiOptions =\n %+v, %v\nwant\n %+v", got, err, tt.want)
			}
		})
	}
	// No silent fallback: a setting Load would refuse is an error, not the default.
	_, err := apiOptions(&config.Config{Policy: "lru", Budget: 0.5})
	var ce *elasticcache.ConfigError
	if !errors.As(err, &ce) || ce.Field != "policy" {
		t.Fatalf("apiOptions with policy lru: %v, want the ConfigError", err)
	}
}
