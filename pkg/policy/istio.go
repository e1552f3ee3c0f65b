package policy

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// FromIstio converts the spec of a security.istio.io AuthorizationPolicy,
// as the dynamic client decodes it (map[string]any, []any, string, int64,
// float64, bool), into a Policy. What is not L4 (methods, paths, hosts,
// requestPrincipals, remoteIpBlocks, when, CUSTOM and AUDIT, targetRefs),
// malformed or unknown makes the policy Invalid, with every reason found,
// never dropped. A missing or empty spec is Istio's "allow nothing".
func FromIstio(namespace, name string, spec any) Policy {
	p := Policy{Name: name, Namespace: namespace, Action: Allow}
	c := converter{}
	m, ok := c.object("spec", spec)
	if !ok {
		p.Invalid = c.reason()
		return p
	}
	for _, k := range sortedKeys(m) {
		v := m[k]
		switch k {
		case "selector":
			p.Selector = c.selector(v)
		case "action":
			s, _ := v.(string)
			switch s {
			case "ALLOW", "DENY":
				p.Action = Action(s)
			case "":
				// Istio's default.
				if _, isString := v.(string); !isString {
					c.addf("action: %s is not a string", describe(v))
				}
			default:
				c.addf("action %q is not supported at L4 (want ALLOW or DENY)", s)
			}
		case "rules":
			list, ok := c.list("rules", v)
			if !ok {
				continue
			}
			p.Rules = []Rule{}
			for i, r := range list {
				p.Rules = append(p.Rules, c.rule(fmt.Sprintf("rules[%d]", i), r))
			}
		case "provider":
			c.addf("provider (action CUSTOM) is not supported at L4")
		case "targetRef", "targetRefs":
			c.addf("%s is not supported (smesh selects workloads by selector only)", k)
		default:
			c.addf("unknown field %q", k)
		}
	}
	p.Invalid = c.reason()
	return p
}

// converter gathers the problems of one policy.
type converter struct{ why []string }

func (c *converter) addf(format string, args ...any) {
	// A policy full of problems is one line in a log: keep the first few.
	if len(c.why) < 8 {
		c.why = append(c.why, fmt.Sprintf(format, args...))
	} else if len(c.why) == 8 {
		c.why = append(c.why, "...")
	}
}

func (c *converter) reason() string { return strings.Join(c.why, "; ") }

func (c *converter) object(at string, v any) (map[string]any, bool) {
	if v == nil {
		return map[string]any{}, true
	}
	m, ok := v.(map[string]any)
	if !ok {
		c.addf("%s: %s is not an object", at, describe(v))
	}
	return m, ok
}

func (c *converter) list(at string, v any) ([]any, bool) {
	if v == nil {
		return nil, true
	}
	l, ok := v.([]any)
	if !ok {
		c.addf("%s: %s is not a list", at, describe(v))
	}
	return l, ok
}

func (c *converter) selector(v any) map[string]string {
	m, ok := c.object("selector", v)
	if !ok {
		return nil
	}
	var labels map[string]string
	for _, k := range sortedKeys(m) {
		if k != "matchLabels" {
			c.addf("selector.%s is not supported (want matchLabels)", k)
			continue
		}
		ml, ok := c.object("selector.matchLabels", m[k])
		if !ok {
			continue
		}
		labels = make(map[string]string, len(ml))
		for lk, lv := range ml {
			s, ok := lv.(string)
			if !ok {
				c.addf("selector.matchLabels.%s: %s is not a string", lk, describe(lv))
				continue
			}
			labels[lk] = s
		}
	}
	return labels
}

func (c *converter) rule(at string, v any) Rule {
	var r Rule
	m, ok := c.object(at, v)
	if !ok {
		return r
	}
	for _, k := range sortedKeys(m) {
		switch k {
		case "from":
			list, _ := c.list(at+".from", m[k])
			for i, e := range list {
				r.From = append(r.From, c.from(fmt.Sprintf("%s.from[%d]", at, i), e))
			}
		case "to":
			list, _ := c.list(at+".to", m[k])
			for i, e := range list {
				r.To = append(r.To, c.to(fmt.Sprintf("%s.to[%d]", at, i), e))
			}
		case "when":
			c.addf("%s.when is not supported at L4", at)
		default:
			c.addf("%s: unknown field %q", at, k)
		}
	}
	return r
}

func (c *converter) from(at string, v any) Peer {
	var p Peer
	src, ok := c.wrapped(at, "source", v)
	if !ok {
		return p
	}
	at += ".source"
	before := len(c.why)
	for _, k := range sortedKeys(src) {
		var dst *[]string
		switch k {
		case "principals":
			dst = &p.Principals
		case "notPrincipals":
			dst = &p.NotPrincipals
		case "namespaces":
			dst = &p.Namespaces
		case "notNamespaces":
			dst = &p.NotNamespaces
		case "ipBlocks":
			dst = &p.IPBlocks
		case "notIpBlocks":
			dst = &p.NotIPBlocks
		case "requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks":
			c.addf("%s.%s is not supported at L4", at, k)
			continue
		default:
			c.addf("%s: unknown field %q", at, k)
			continue
		}
		*dst = c.strings(at+"."+k, src[k])
	}
	if len(c.why) == before && len(p.Principals)+len(p.NotPrincipals)+len(p.Namespaces)+len(p.NotNamespaces)+len(p.IPBlocks)+len(p.NotIPBlocks) == 0 {
		// Only empty lists: Istio refuses an empty source rather than
		// read it as "any source".
		c.addf("%s has no value", at)
	}
	return p
}

func (c *converter) to(at string, v any) Operation {
	var o Operation
	op, ok := c.wrapped(at, "operation", v)
	if !ok {
		return o
	}
	at += ".operation"
	before := len(c.why)
	for _, k := range sortedKeys(op) {
		switch k {
		case "ports":
			o.Ports = c.ports(at+"."+k, op[k])
		case "notPorts":
			o.NotPorts = c.ports(at+"."+k, op[k])
		case "hosts", "notHosts", "methods", "notMethods", "paths", "notPaths":
			c.addf("%s.%s is not supported at L4", at, k)
		default:
			c.addf("%s: unknown field %q", at, k)
		}
	}
	if len(c.why) == before && len(o.Ports)+len(o.NotPorts) == 0 {
		c.addf("%s has no port", at)
	}
	return o
}

// wrapped returns v's only field, name (from[].source, to[].operation),
// which must be a non-empty object: Istio refuses an empty one.
func (c *converter) wrapped(at, name string, v any) (map[string]any, bool) {
	m, ok := c.object(at, v)
	if !ok {
		return nil, false
	}
	for _, k := range sortedKeys(m) {
		if k != name {
			c.addf("%s: unknown field %q", at, k)
		}
	}
	inner, ok := c.object(at+"."+name, m[name])
	if ok && len(inner) == 0 {
		c.addf("%s.%s is empty", at, name)
		return nil, false
	}
	return inner, ok
}

func (c *converter) strings(at string, v any) []string {
	list, ok := c.list(at, v)
	if !ok {
		return nil
	}
	out := make([]string, 0, len(list))
	for _, e := range list {
		s, ok := e.(string)
		if !ok {
			c.addf("%s: %s is not a string", at, describe(e))
			continue
		}
		out = append(out, s)
	}
	return out
}

// ports reads Istio's ports, strings of a number ("8080"); plain numbers
// are taken too.
func (c *converter) ports(at string, v any) []uint16 {
	list, ok := c.list(at, v)
	if !ok {
		return nil
	}
	out := make([]uint16, 0, len(list))
	for _, e := range list {
		var n int64 = -1
		switch e := e.(type) {
		case string:
			if x, err := strconv.ParseUint(e, 10, 16); err == nil {
				n = int64(x)
			}
		case int64:
			n = e
		case int:
			n = int64(e)
		case float64:
			if e == math.Trunc(e) && e >= 0 && e <= math.MaxUint16 {
				n = int64(e)
			}
		}
		if n < 1 || n > math.MaxUint16 {
			c.addf("%s: %s is not a port (want 1 to 65535)", at, describe(e))
			continue
		}
		out = append(out, uint16(n))
	}
	return out
}

func describe(v any) string {
	s := fmt.Sprintf("%#v", v)
	if len(s) > 40 {
		s = s[:40] + "..."
	}
	return s
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
