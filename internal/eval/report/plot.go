package report

import (
	"cmp"
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"slices"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// PlotName is the PNG file name of a column's plot for a metric and the rows
// of all samples.
func PlotName(metric, key string) string {
	if key == "peak_cells" {
		return metric + "_peak_cells.png"
	}
	return key + ".png"
}

// KindPlotName is the PNG file name of a column's plot for the rows of one
// sample group: "rougeL_long.png"; PlotName's for KindAll and latency.
func KindPlotName(metric, key, kind string) string {
	if kind == "" || kind == KindAll {
		return PlotName(metric, key)
	}
	return key + "_" + kind + ".png"
}

// Plots writes one PNG per plotted column that has data (metric against budget)
// into dir and returns their paths: for the rows of all samples, then for each
// sample group that has rows (KindPlotName). Peak KV cells are plotted for
// latency only.
func (res *Results) Plots(dir string) ([]string, error) {
	var files []string
	for _, m := range res.Metrics() {
		for _, k := range res.groups(m) {
			rows := res.rowsOf(m, k)
			for _, c := range columns {
				if !c.plot || !slices.Contains(c.metrics, m) || c.key == "peak_cells" && m != Latency {
					continue
				}
				if !slices.ContainsFunc(rows, c.applies) {
					continue
				}
				path := filepath.Join(dir, KindPlotName(m, c.key, k))
				if err := plotColumn(path, res.Title, k, rows, c); err != nil {
					return files, fmt.Errorf("report: plot %s: %w", path, err)
				}
				files = append(files, path)
			}
		}
	}
	return files, nil
}

func plotColumn(path, title, kind string, rows []Row, c column) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s vs KV budget (%s is better)", c.title, c.better)
	if kind != "" && kind != KindAll {
		p.Title.Text += ": " + strings.ToLower(kindTitle(kind))
	}
	if title != "" {
		p.Title.Text += "\n" + title
	}
	p.X.Label.Text = "KV budget (fraction of prompt entries kept)"
	p.Y.Label.Text = c.title
	p.Legend.Top = true
	p.Legend.Left = c.better == "lower"
	p.Add(plotter.NewGrid())

	lo, hi := math.Inf(1), math.Inf(-1)
	var policies []string
	byPolicy := map[string]plotter.XYs{}
	fullV, hasFull := 0.0, false
	for _, r := range rows {
		if !c.applies(r) {
			continue
		}
		v := c.get(r)
		if math.IsNaN(v) || math.IsInf(v, 0) {
			continue
		}
		lo, hi = math.Min(lo, v), math.Max(hi, v)
		if r.Policy == FullPolicy {
			fullV, hasFull = v, true
			continue
		}
		if _, ok := byPolicy[r.Policy]; !ok {
			policies = append(policies, r.Policy)
		}
		byPolicy[r.Policy] = append(byPolicy[r.Policy], plotter.XY{X: r.Budget, Y: v})
	}
	for i, pol := range policies {
		pts := byPolicy[pol]
		slices.SortFunc(pts, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
		line, points, err := plotter.NewLinePoints(pts)
		if err != nil {
			return err
		}
		line.Color = plotutil.Color(i)
		line.Width = vg.Points(1.5)
		points.Color = plotutil.Color(i)
		points.Shape = plotutil.Shape(i)
		p.Add(line, points)
		p.Legend.Add(pol, line, points)
	}
	if hasFull {
		line, err := plotter.NewLine(plotter.XYs{{X: 0, Y: fullV}, {X: 1, Y: fullV}})
		if err != nil {
			return err
		}
		line.Color = color.Gray{Y: 60}
		line.Dashes = []vg.Length{vg.Points(6), vg.Points(4)}
		line.Width = vg.Points(1.5)
		p.Add(line)
		p.Legend.Add(FullPolicy, line)
	}
	p.X.Min, p.X.Max = 0, 1
	if !math.IsInf(lo, 0) {
		span := hi - lo
		if span < 1e-9*math.Max(1, math.Abs(hi)) {
			span = 0.1*math.Abs(hi) + 1e-3
		}
		// Room above the data for the legend, which sits at the top.
		p.Y.Min, p.Y.Max = lo-0.08*span, hi+0.45*span
	}
	return p.Save(7*vg.Inch, 4.5*vg.Inch, path)
}
