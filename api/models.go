package api

import (
	"net/http"

	"github.com/go-chi/chi/v5"
)

const ownedBy = "elasticserve"

// servedModel is the id clients see: the alias, or the backend's model id.
func (s *server) servedModel(info BackendInfo) string {
	if s.opts.ModelAlias != "" {
		return s.opts.ModelAlias
	}
	return info.ModelID
}

// knownModel reports whether name refers to the loaded model.
func (s *server) knownModel(name string, info BackendInfo) bool {
	return name != "" && (name == s.servedModel(info) || name == info.ModelID)
}

func modelNotFound(name, served string) *apiError {
	e := notFound("model_not_found", "the model '%s' does not exist; this server serves '%s'", name, served)
	return e
}

func (s *server) modelObject(info BackendInfo) Model {
	var created int64
	if !info.Created.IsZero() {
		created = info.Created.Unix()
	}
	m := Model{ID: s.servedModel(info), Object: "model", Created: created, OwnedBy: ownedBy}
	if info.CachePolicies != nil {
		c := s.opts.Cache
		m.ElasticCache = &ModelCache{Policies: info.CachePolicies, Default: &CacheDefault{Policy: string(c.Policy()),
			Budget: c.Budget(), Selection: string(c.Selection()), Sink: c.Sink(), Distance: c.Distance()}}
	}
	return m
}

// ModelCache is a model object's elastic_cache field.
type ModelCache struct {
	Policies []ModelPolicy `json:"policies"`
	// Default is the setting a request without elastic_cache gets.
	Default *CacheDefault `json:"default,omitempty"`
}

// CacheDefault is the server's default Elastic Cache setting.
type CacheDefault struct {
	Policy    string  `json:"policy"`
	Budget    float64 `json:"budget"`
	Selection string  `json:"selection"`
	Sink      int     `json:"sink"`
	Distance  int     `json:"distance"`
}

// ModelPolicy says whether the loaded model can apply a cache policy below budget 1
// (full always runs), and why not.
type ModelPolicy struct {
	Policy    string `json:"policy"`
	Supported bool   `json:"supported"`
	Reason    string `json:"reason,omitempty"`
}

func (s *server) handleListModels(w http.ResponseWriter, _ *http.Request) {
	info := s.backend.Info()
	writeJSON(w, http.StatusOK, ModelList{Object: "list", Data: []Model{s.modelObject(info)}})
}

// handleGetModel serves /v1/models/{id}; ids may contain '/', hence the wildcard.
func (s *server) handleGetModel(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "*")
	info := s.backend.Info()
	if !s.knownModel(id, info) {
		writeError(w, modelNotFound(id, s.servedModel(info)))
		return
	}
	writeJSON(w, http.StatusOK, s.modelObject(info))
}
