package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"
)

// Parse reads one policy document strictly (unknown fields, duplicate keys,
// wrong types, several documents are errors), validates it and returns it
// normalised. The error is an ErrorList holding every problem found.
func Parse(data []byte) (*Policy, error) {
	p, errs := decodePolicy(data)
	if p == nil {
		return nil, errs.err()
	}
	errs = append(errs, p.validate(errs)...)
	if err := errs.err(); err != nil {
		return nil, err
	}
	p.normalize()
	return p, nil
}

// LoadFile reads and parses the policy in the file at path.
func LoadFile(path string) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading policy: %w", err)
	}
	p, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return p, nil
}

// Aliases let a small document stand for a huge one ("billion laughs"):
// the nodes reached through aliases may add at most the document's own size
// plus aliasAllowance, so decoding stays linear in the input.
const aliasAllowance = 1 << 18

// expansion measures a YAML tree as decoding would walk it, aliases
// expanded, without walking it that way: the sizes of anchored nodes (the
// only ones aliases can share) are memoised.
type expansion struct {
	memo   map[*yaml.Node]int
	active map[*yaml.Node]bool // anchored nodes being measured
	nodes  int                 // nodes in the document itself
	cyclic bool
}

const sizeCap = 1 << 40

func (e *expansion) size(n *yaml.Node) int {
	if n.Anchor != "" {
		if s, ok := e.memo[n]; ok {
			return s
		}
		if e.active[n] {
			e.cyclic = true
			return 0
		}
		e.active[n] = true
		defer delete(e.active, n)
	}
	e.nodes++
	s := 1
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		s += e.size(n.Alias)
	}
	for _, c := range n.Content {
		s = min(s+e.size(c), sizeCap)
	}
	if n.Anchor != "" {
		e.memo[n] = s
	}
	return s
}

// decodePolicy turns YAML into a Policy and the decoding problems. It
// returns a nil Policy when the input is not exactly one YAML document (an
// empty document after it, as a trailing "---" makes, is tolerated).
func decodePolicy(data []byte) (p *Policy, errs ErrorList) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := safeDecode(dec, &doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, ErrorList{{Msg: "empty document"}}
		}
		return nil, ErrorList{syntaxError(err)}
	}
	for {
		var extra yaml.Node
		err := safeDecode(dec, &extra)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, ErrorList{syntaxError(err)}
		}
		if len(extra.Content) != 1 || !isNull(extra.Content[0]) {
			return nil, ErrorList{{Msg: "more than one YAML document (one policy per file)", Line: extra.Line}}
		}
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind == yaml.ScalarNode && root.ShortTag() == "!!null" {
		return nil, ErrorList{{Msg: "empty document", Line: root.Line}}
	}
	e := &expansion{memo: map[*yaml.Node]int{}, active: map[*yaml.Node]bool{}}
	switch expanded := e.size(root); {
	case e.cyclic:
		return nil, ErrorList{{Msg: "an alias refers to a node that contains it"}}
	case expanded > 2*e.nodes+aliasAllowance:
		return nil, ErrorList{{Msg: fmt.Sprintf("aliases expand the document to more than %d nodes", 2*e.nodes+aliasAllowance)}}
	}
	d := &decoder{lines: map[string]int{"": root.Line}}
	p = &Policy{}
	d.decode(root, reflect.ValueOf(p).Elem(), "")
	p.lines = d.lines
	return p, d.errs
}

// safeDecode turns a panic of the YAML library into an error: a policy is
// untrusted input to a long-running daemon, which must not crash on it.
func safeDecode(dec *yaml.Decoder, n *yaml.Node) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("yaml: %v", r)
		}
	}()
	return dec.Decode(n)
}

var yamlLineRE = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// syntaxError locates a YAML syntax error ("yaml: line 3: did not find
// expected key").
func syntaxError(err error) *FieldError {
	msg := err.Error()
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &FieldError{Msg: "invalid YAML: " + m[2], Line: line}
	}
	return &FieldError{Msg: "invalid YAML: " + strings.TrimPrefix(msg, "yaml: ")}
}

// decoder fills Go values from YAML nodes by the fields' yaml tags,
// reporting every mismatch with its field path.
type decoder struct {
	errs  ErrorList
	lines map[string]int
}

func (d *decoder) fail(path string, line int, format string, args ...any) {
	d.errs = append(d.errs, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...), Line: line})
}

func (d *decoder) decode(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind == yaml.AliasNode {
		if n.Alias == nil {
			d.fail(path, n.Line, "alias to an unknown anchor")
			return
		}
		n = n.Alias
	}
	if isNull(n) {
		return // null is the same as absent
	}
	switch v.Kind() {
	case reflect.Pointer:
		elem := reflect.New(v.Type().Elem())
		d.decode(n, elem.Elem(), path)
		v.Set(elem)
	case reflect.Struct:
		d.decodeStruct(n, v, path)
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode || n.ShortTag() != "!!seq" {
			d.fail(path, n.Line, "expected a list, got %s", describe(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			ip := path + "[" + strconv.Itoa(i) + "]"
			d.lines[ip] = item.Line
			d.decode(item, s.Index(i), ip)
		}
		v.Set(s)
	case reflect.String:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
			d.fail(path, n.Line, "expected a string, got %s", describe(n))
			return
		}
		v.SetString(n.Value)
	case reflect.Int, reflect.Int64:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
			d.fail(path, n.Line, "expected an integer, got %s", describe(n))
			return
		}
		var i int64
		if err := n.Decode(&i); err != nil || v.OverflowInt(i) {
			d.fail(path, n.Line, "%s is out of range", n.Value)
			return
		}
		v.SetInt(i)
	case reflect.Bool:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" {
			d.fail(path, n.Line, "expected true or false, got %s", describe(n))
			return
		}
		var b bool
		if err := n.Decode(&b); err != nil {
			d.fail(path, n.Line, "%s is not true or false", n.Value)
			return
		}
		v.SetBool(b)
	default:
		panic("policy: no YAML decoding for " + v.Type().String())
	}
}

func (d *decoder) decodeStruct(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.MappingNode || n.ShortTag() != "!!map" {
		d.fail(path, n.Line, "expected a mapping, got %s", describe(n))
		return
	}
	fields := fieldsOf(v.Type())
	seen := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.Kind == yaml.AliasNode && k.Alias != nil {
			k = k.Alias
		}
		if k.Kind != yaml.ScalarNode {
			d.fail(path, k.Line, "expected a field name, got %s", describe(k))
			continue
		}
		fp := k.Value
		if path != "" {
			fp = path + "." + k.Value
		}
		if k.ShortTag() == "!!merge" {
			// Reported on the mapping: what it would have merged is
			// unknown, so nothing in it is checked further.
			d.fail(path, k.Line, "merge keys (<<) are not supported")
			continue
		}
		if first, dup := seen[k.Value]; dup {
			d.fail(fp, k.Line, "duplicate key (first at line %d)", first)
			continue
		}
		seen[k.Value] = k.Line
		idx, ok := fields.byName[k.Value]
		if !ok {
			msg := "unknown field"
			if s := suggest(k.Value, fields.names); s != "" {
				msg += " (did you mean " + s + "?)"
			}
			d.fail(fp, k.Line, "%s", msg)
			continue
		}
		d.lines[fp] = k.Line
		d.decode(val, v.Field(idx), fp)
	}
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe names what a node is, for "expected X, got Y" messages.
func describe(n *yaml.Node) string {
	switch t := n.ShortTag(); {
	case n.Kind == yaml.MappingNode && t == "!!map":
		return "a mapping"
	case n.Kind == yaml.SequenceNode && t == "!!seq":
		return "a list"
	case n.Kind == yaml.MappingNode || n.Kind == yaml.SequenceNode:
		return "a value tagged " + t
	}
	switch n.Kind {
	case yaml.AliasNode:
		return "an alias"
	case yaml.DocumentNode:
		return "a document"
	}
	switch t := n.ShortTag(); t {
	case "!!str":
		return strconv.Quote(n.Value)
	case "!!int":
		return "the integer " + n.Value
	case "!!float":
		return "the number " + n.Value
	case "!!bool":
		return "the boolean " + n.Value
	case "!!timestamp":
		return "the timestamp " + n.Value
	case "!!binary":
		return "binary data"
	default:
		return "a value tagged " + t
	}
}

type structFields struct {
	byName map[string]int
	names  []string
}

var fieldCache sync.Map // reflect.Type -> *structFields

// fieldsOf maps the yaml names of t's exported fields to their indexes.
func fieldsOf(t reflect.Type) *structFields {
	if f, ok := fieldCache.Load(t); ok {
		return f.(*structFields)
	}
	f := &structFields{byName: map[string]int{}}
	for i := range t.NumField() {
		sf := t.Field(i)
		if !sf.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(sf.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		f.byName[name] = i
		f.names = append(f.names, name)
	}
	fieldCache.Store(t, f)
	return f
}

// suggest returns the known field name closest to an unknown one, if it is
// close enough to be a likely typo.
func suggest(unknown string, names []string) string {
	best, bestDist := "", 3
	for _, n := range names {
		if strings.EqualFold(n, unknown) {
			return n
		}
		if dist := editDistance(strings.ToLower(unknown), strings.ToLower(n)); dist < bestDist {
			best, bestDist = n, dist
		}
	}
	return best
}

func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return len(a) + len(b) // not worth comparing
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
